"""What learns or predicts, one subpackage per pipeline: ``sae/``, ``send/``, ``interpret/``.

Plain ``nn.Module``s and tensor math sit beside the thin LightningModules that use them. Configs name the classes
by these exports (``neurolight.lightning_modules.SendModule``), so a file can move without breaking a recipe.
"""

from neurolight._lazy import lazy_exports

# Imports torch, not Lightning: the registry's classes are exported under their class names.
from neurolight.lightning_modules.sae.architectures import ARCHITECTURES

# Lazy: importing one export does not import Lightning for the others.
_EXPORTS = {
    "Architecture": "neurolight.lightning_modules.sae.architectures",
    **{cls.__name__: "neurolight.lightning_modules.sae.architectures" for cls in ARCHITECTURES.values()},
    "SparseAutoencoder": "neurolight.lightning_modules.sae.sparse_autoencoder",
    "SparseAutoencoderModule": "neurolight.lightning_modules.sae.module",
    "SparseAutoencoderSweep": "neurolight.lightning_modules.sae.sweep",
    "SweepMember": "neurolight.lightning_modules.sae.sweep",
    "SaeEvaluator": "neurolight.lightning_modules.sae.evaluator",
    "SaeMetadata": "neurolight.lightning_modules.sae.metadata",
    "SendModule": "neurolight.lightning_modules.send.module",
    "AnswerGenerator": "neurolight.lightning_modules.send.answer_generator",
    "LatentInterpreter": "neurolight.lightning_modules.interpret.interpreter",
    "LatentSampler": "neurolight.lightning_modules.interpret.latent_sampler",
    "RunningLatentSamples": "neurolight.lightning_modules.interpret.running_samples",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
