"""The training sides of ``bench/sae_throughput.py`` and ``bench/sae_sweep.py``, each run in its own subprocess:
neurolight (a Lightning ``Trainer`` on the recipe's module and ``ActivationDataModule``) and SAELens (its
``LanguageModelSAETrainingRunner``, one SAE after another; ``MultiSAETrainingRunner`` is in ``sae_sweep.py``), with
the clock that times the LLM forwards and SAE steps inside them.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from sae_runs import side_settings  # bench/, beside this script


# ---------------------------------------------------------------------------------------------- measuring
class Clock:
    """Time inside the LLM forward and inside the SAE steps.

    On CPU, wall-clock intervals. On CUDA, intervals between CUDA events recorded on the stream, read once at the
    end, so that measuring adds no synchronisation (a synchronize per step would change what is measured); the
    total training time is wall-clock on both (one synchronize at each end).
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.reset()

    def reset(self) -> None:
        """Forget every interval (the next training run of the same process starts from zero)."""
        self.llm: list = []  # (start, end) marks of every LLM forward
        self.llm_in_step: list = []  # those inside a step (none expected): LLM time, not SAE time
        self.step: list = []
        self.llm_contexts = 0
        self.active = False
        self.in_step = False
        self._step_start = None

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wall(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def durations(self, intervals: list) -> list[float]:
        """Seconds of each (start, end) interval."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000 for start, end in intervals]
        return [end - start for start, end in intervals]

    @property
    def llm_s(self) -> float:
        return sum(self.durations(self.llm))

    @property
    def step_s(self) -> float:
        return sum(self.durations(self.step)) - sum(self.durations(self.llm_in_step))

    @property
    def llm_calls(self) -> int:
        return len(self.llm)

    def wrap_llm(self, fn):
        clock = self

        def timed(*args, **kwargs):
            if not clock.active:
                return fn(*args, **kwargs)
            start = clock.mark()
            out = fn(*args, **kwargs)
            interval = (start, clock.mark())
            clock.llm.append(interval)
            if clock.in_step:
                clock.llm_in_step.append(interval)
            # (contexts, positions, d_in) on both sides; SAELens's multi-hook forward returns one per hook.
            first = next(iter(out.values())) if isinstance(out, dict) else out
            clock.llm_contexts += int(first.shape[0])
            return out

        return timed

    def step_start(self) -> None:
        self.in_step = True
        self._step_start = self.mark()

    def step_end(self) -> None:
        self.step.append((self._step_start, self.mark()))
        self.in_step = False


def memory_report(device: str) -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def side_result(side: str, steps: int, batch_sae: int, marks: dict, t_setup: float, clock, positions: int, device):
    """One training run's figures, in the same keys for both tools."""
    return {
        "side": side,
        "steps": steps,
        "tokens": steps * batch_sae,
        "train_s": marks["end"] - marks["start"],
        "setup_s": marks["start"] - t_setup,
        "llm_s": clock.llm_s,
        "sae_step_s": clock.step_s,
        "llm_forwards": clock.llm_calls,
        "llm_contexts": clock.llm_contexts,
        "harvested": clock.llm_contexts * positions,
        "llm_intervals_s": clock.durations(clock.llm),
        "step_intervals_s": clock.durations(clock.step),
        "threads": marks["threads"],
        "rss_before_train_mib": marks["rss_before_train_mib"],
        **memory_report(device),
    }


def sequential(results: list[dict]) -> dict:
    """Runs one after another in one process, as one result: times, forwards and intervals added up; ``members``
    keeps each run's own."""
    total = dict(results[0])
    for key in ("train_s", "setup_s", "llm_s", "sae_step_s", "llm_forwards", "llm_contexts", "harvested"):
        total[key] = sum(r[key] for r in results)
    for key in ("peak_rss_mib", "peak_cuda_mib"):
        if key in total:
            total[key] = max(r[key] for r in results)
    total["llm_intervals_s"] = [s for r in results for s in r["llm_intervals_s"]]
    total["step_intervals_s"] = [s for r in results for s in r["step_intervals_s"]]
    total["members"] = results
    return total


# --------------------------------------------------------------------------------------------- neurolight
def build_module(recipe: dict):
    """The recipe's LightningModule: a ``SparseAutoencoderModule`` or a ``SparseAutoencoderSweep``."""
    import neurolight.lightning_modules as modules

    return getattr(modules, recipe["class"].rsplit(".", 1)[-1])(**recipe["model"])


def run_neurolight(args, recipe: dict) -> dict:
    """Train the recipe's module with a Lightning Trainer; with ``args.output``, save the checkpoint there."""
    import lightning.pytorch as pl
    import torch

    from neurolight.datamodules import ActivationDataModule
    from neurolight.datamodules.llm.hooked import HookedLLM

    t_setup = time.perf_counter()
    data = recipe["data"]
    settings = side_settings("neurolight", args.setting, args, set(args.without))
    clock = Clock(args.device)
    HookedLLM.harvest = clock.wrap_llm(HookedLLM.harvest)
    pl.seed_everything(recipe["seed"], verbose=False)
    datamodule = ActivationDataModule(
        **{
            **data,
            "dataset_path": args.corpus,
            "model_name": args.model,
            "device_llm": args.device,
            "llm_dtype": settings["llm_dtype"],
            "buffer_dtype": settings["buffer_dtype"],
            "compile_llm": settings["compile_llm"],
        }
    )
    module = build_module(recipe)
    steps = args.steps
    positions = int(data["num_tokens"]) - int(bool(data.get("exclude_first_position", True)))
    marks: dict[str, float] = {}

    class Timer(pl.Callback):
        # on_fit_start: after setup (model loading), before Lightning fetches the first batch (buffer fill).
        def on_fit_start(self, trainer, pl_module):
            marks["rss_before_train_mib"] = rss_mib()
            marks["threads"] = torch.get_num_threads()
            clock.active = True
            marks["start"] = clock.wall()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.step_start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.step_end()

        def on_train_end(self, trainer, pl_module):
            marks["end"] = clock.wall()
            clock.active = False

    trainer = pl.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=1,
        precision=settings["precision"],
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=[Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=args.workdir,
    )
    marks["fit_called"] = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    if trainer.global_step != steps:
        raise RuntimeError(f"neurolight trained {trainer.global_step} steps, expected {steps}")
    if args.output:
        trainer.save_checkpoint(args.output)
    batch_sae = int(data["batch_size_autoencoder"])
    result = side_result("neurolight", steps, batch_sae, marks, t_setup, clock, positions, args.device)
    # Which forward ran: a truncated forward that fails its probe falls back to the hooked one with a warning only,
    # which a GPU run's figures once hid (bench/README.md, On a lent GPU machine).
    forwards = {("truncated" if h.truncated else "hooked") + (" compiled" if h.compiled else "")
                for h in datamodule.hooked_llms.values()}  # fmt: skip
    return {**result, "settings": {**settings, "llm_forward": "/".join(sorted(forwards))}}


# ------------------------------------------------------------------------------------------------ SAELens
class SaelensTimer:
    """Times SAELens's training: patches, once per process, its store's LLM forwards (single- and multi-hook), the
    SAE step and the fit of ``SAETrainer`` and ``MultiSAETrainer``; ``reset`` before each run."""

    def __init__(self, device: str) -> None:
        import torch
        from sae_lens.training.activations_store import ActivationsStore
        from sae_lens.training.multi_sae_trainer import MultiSAETrainer
        from sae_lens.training.sae_trainer import SAETrainer

        self.clock = Clock(device)
        self.marks: dict[str, float] = {}
        clock, marks = self.clock, self.marks
        store = ActivationsStore
        store.get_activations = clock.wrap_llm(store.get_activations)
        store.get_multi_hook_activations = clock.wrap_llm(store.get_multi_hook_activations)
        step = SAETrainer.step

        # The step does not include maybe_reset_sparsity / pbar updates, which the loop does around it: they land
        # in "other", as Lightning's loop overhead does on the neurolight side.
        def timed_step(self, batch):
            clock.step_start()
            out = step(self, batch)
            clock.step_end()
            return out

        def timed(fit):
            def timed_fit(self):
                marks["rss_before_train_mib"] = rss_mib()
                marks["threads"] = torch.get_num_threads()
                clock.active = True
                marks["start"] = clock.wall()
                try:
                    return fit(self)
                finally:
                    marks["end"] = clock.wall()
                    clock.active = False
                    marks["steps"] = self.n_training_steps

            return timed_fit

        SAETrainer.step = timed_step
        SAETrainer.fit, MultiSAETrainer.fit = timed(SAETrainer.fit), timed(MultiSAETrainer.fit)

    def reset(self) -> None:
        self.clock.reset()
        self.marks.clear()


def saelens_members(recipe: dict) -> dict[str, tuple[int, int]]:
    """The recipe's TopK SAEs as {name: (d_sae, k)}: one for a single-SAE recipe, every member of a sweep's."""
    model = recipe["model"]
    members = model.get("saes") or [{"name": "sae", **model}]
    out = {}
    for member in members:
        architecture = member["architecture"]
        if not architecture["class_path"].endswith("TopK"):
            raise ValueError(f"the SAELens side trains TopK SAEs; {member['name']} is {architecture['class_path']}")
        out[member["name"]] = (int(member["dict_vec_size"]), int(architecture["init_args"]["k"]))
    return out


def saelens_dataset(args, recipe: dict):
    """The training contexts as a pretokenized ``datasets.Dataset``, in the order neurolight reads them in its
    first pass over the corpus."""
    import datasets
    import torch

    from neurolight.datamodules.sae.tokenized_corpus import TokenizedCorpus

    data = recipe["data"]
    corpus = TokenizedCorpus(args.corpus)
    n_train = len(corpus) - int(data.get("val_contexts", 64))
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(recipe["seed"] * 1_000_003))
    ids = corpus.batch(order.numpy())[:, : int(data["num_tokens"])]
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()})


def saelens_config(args, recipe: dict, settings: dict, output: str | None) -> dict:
    """The runner settings shared by ``LanguageModelSAERunnerConfig`` and ``MultiSAETrainingRunnerConfig``: the
    recipe's data, batch sizes, buffer and optimiser; wandb, checkpoints and evals off."""
    from sae_lens import LoggingConfig

    data, model = recipe["data"], recipe["model"]
    num_tokens = int(data["num_tokens"])
    batch_sae = int(data["batch_size_autoencoder"])
    skip_first = bool(data.get("exclude_first_position", True))
    # neurolight's buffer holds num_batches_preload * batch_size_autoencoder activations; SAELens's mixing buffer
    # holds n_batches_in_buffer * (positions kept per context) of them.
    buffer_rows = int(data["num_batches_preload"]) * batch_sae
    betas = model.get("adam_betas", (0.9, 0.999))
    return dict(
        model_name=args.model,
        model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": settings["llm_dtype"]},
        dataset_path="",
        streaming=False,
        context_size=num_tokens,
        seqpos_slice=(1, None) if skip_first else (None,),
        n_batches_in_buffer=max(1, round(buffer_rows / (num_tokens - int(skip_first)))),
        training_tokens=args.steps * batch_sae,
        store_batch_size_prompts=int(data["batch_size_llm"]),
        train_batch_size_tokens=batch_sae,
        device=args.device,
        seed=recipe["seed"],
        dtype="float32",
        autocast=settings["autocast"],
        autocast_lm=settings["autocast_lm"],
        compile_llm=settings["compile_llm"],
        lr=float(model.get("learning_rate", 2e-4)),
        lr_warm_up_steps=int(model.get("lr_warmup_steps", 0)),
        adam_beta1=float(betas[0]),
        adam_beta2=float(betas[1]),
        dead_feature_window=max(1, int(model.get("dead_tokens_threshold", 10_000_000)) // batch_sae - 1),
        feature_sampling_window=10**9,
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=output,
    )


def saelens_sae_config(args, recipe: dict, d_sae: int, k: int):
    from sae_lens import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(
        d_in=int(recipe["model"]["act_vec_size"]),
        d_sae=d_sae,
        k=k,
        dtype="float32",
        device=args.device,
        normalize_activations="none",
    )


def saelens_setup(recipe: dict):
    """Quiet SAELens's logging and datasets' progress bars; check the site; the hook name of the site."""
    import logging

    import datasets

    from neurolight.datamodules.llm.hooked import HOOK_POINTS

    logging.getLogger("sae_lens").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    data = recipe["data"]
    if data["layer_type"] not in ("mlp_sublayer", "attn_sublayer"):
        raise ValueError("the SAELens side reads module outputs: use layer_type mlp_sublayer or attn_sublayer")
    return HOOK_POINTS[data["layer_type"]].format(int(data["layer_id"]))


def run_saelens(args, recipe: dict) -> dict:
    """Train the recipe's SAEs one after another with ``LanguageModelSAETrainingRunner`` (one for a single-SAE
    recipe); with ``args.output``, each SAE is saved in SAELens's format into ``args.output/NAME``."""
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner

    t_setup = time.perf_counter()
    hook_name = saelens_setup(recipe)
    data = recipe["data"]
    settings = side_settings("saelens", args.setting, args, set(args.without))
    positions = int(data["num_tokens"]) - int(bool(data.get("exclude_first_position", True)))
    dataset = saelens_dataset(args, recipe)
    timer = SaelensTimer(args.device)
    results = []
    for name, (d_sae, k) in saelens_members(recipe).items():
        timer.reset()
        output = str(Path(args.output) / name) if args.output else None
        cfg = LanguageModelSAERunnerConfig(
            sae=saelens_sae_config(args, recipe, d_sae, k),
            hook_name=hook_name,
            is_dataset_tokenized=True,
            compile_sae=settings["compile_sae"],
            verbose=False,
            **saelens_config(args, recipe, settings, output),
        )
        torch.manual_seed(recipe["seed"])
        LanguageModelSAETrainingRunner(cfg, override_dataset=dataset).run()
        if timer.marks.get("steps") != args.steps:
            raise RuntimeError(f"SAELens trained {timer.marks.get('steps')} steps, expected {args.steps}")
        batch_sae = int(data["batch_size_autoencoder"])
        results.append(
            side_result(name, args.steps, batch_sae, timer.marks, t_setup, timer.clock, positions, args.device)
        )
        t_setup = time.perf_counter()
    n_batches_in_buffer = cfg.n_batches_in_buffer
    return {**sequential(results), "side": "saelens", "settings": settings, "n_batches_in_buffer": n_batches_in_buffer}
