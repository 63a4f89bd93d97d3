"""neurolight.lightning_modules.send.qa_metrics: EigenScore against numpy's eigenvalues of np.cov, the efficient
estimate against
both on matrices with known spectra, the KPM pieces, the torchmetrics wrappers (one process and two gloo ranks),
and the QA scores on hand-computed cases."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from neurolight.lightning_modules.send.detection_eval import auroc
from neurolight.lightning_modules.send.eigenscore import (
    chebyshev_polynomials,
    efficient_eigenscore,
    eigenscore,
    jackson_damping,
    spectral_upper_bound,
)
from neurolight.lightning_modules.send.qa_metrics import (
    EfficientEigenScore,
    EigenScore,
    exact_match,
    token_f1,
    truthfulqa_closer_to_correct,
)

ALPHA = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_eigenscore(z: torch.Tensor, alpha: float = ALPHA) -> float:
    """The definition, independently: mean log(eigenvalue + alpha) of np.cov(Z) (rows are variables, ddof 1), with
    float64 eigenvalues from LAPACK through torch (numpy's threaded OpenBLAS takes seconds on busy shared cores)."""
    eigenvalues = torch.linalg.eigvalsh(torch.from_numpy(np.atleast_2d(np.cov(z.double().numpy())))).numpy()
    return float(np.mean(np.log(np.clip(eigenvalues, 0, None) + alpha)))


def with_spectrum(eigenvalues: torch.Tensor, num_rows: int, d: int, seed: int = 0) -> torch.Tensor:
    """(num_rows, d) float64 Z whose covariance has exactly these nonzero eigenvalues: Z = U diag(s) V^T with V
    orthogonal to 1_d, so that the centring leaves Z unchanged and Z Z^T / (d - 1) = U diag(eigenvalues) U^T."""
    generator = torch.Generator().manual_seed(seed)
    rank = eigenvalues.numel()
    u, _ = torch.linalg.qr(torch.randn(num_rows, rank, generator=generator, dtype=torch.float64))
    v = torch.randn(d, rank, generator=generator, dtype=torch.float64)
    v, _ = torch.linalg.qr(v - v.mean(0))
    return u * (eigenvalues.double() * (d - 1)).sqrt() @ v.T


def family(name: str, num_rows: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(num_rows, d, generator=generator)
    if name == "outliers":  # a few feature dimensions x50, like LLM residual streams' massive activations
        z[:, torch.randperm(d, generator=generator)[:4]] *= 50
    elif name == "power-law":
        rank = min(num_rows, d - 1)
        z = with_spectrum(torch.arange(1, rank + 1, dtype=torch.float64) ** -1.0, num_rows, d, seed).float()
    return z


@pytest.mark.parametrize(("num_rows", "d"), [(500, 256), (64, 1000), (300, 100), (1, 5)])
def test_eigenscore__matches_numpy_eigenvalues_of_np_cov(num_rows, d):
    z = torch.randn(num_rows, d, generator=torch.Generator().manual_seed(num_rows)) * 0.3 + 1.0
    expected = numpy_eigenscore(z)
    assert eigenscore(z).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert eigenscore(z.double()).item() == pytest.approx(expected, rel=1e-10)


def test_eigenscore__counts_zero_eigenvalues_of_a_known_spectrum():
    eigenvalues = torch.tensor([4.0, 2.0, 0.5, 0.01])
    z = with_spectrum(eigenvalues, num_rows=10, d=50)
    expected = (torch.log(eigenvalues.double() + ALPHA).sum().item() + 6 * math.log(ALPHA)) / 10
    assert eigenscore(z).item() == pytest.approx(expected, rel=1e-10)
    assert eigenscore(z.float()).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["gaussian", "power-law", "outliers"])
@pytest.mark.parametrize(("num_rows", "d"), [(500, 256), (200, 600), (64, 1000), (300, 100)])
def test_efficient_eigenscore__slq_within_1_percent(name, num_rows, d):
    z = family(name, num_rows, d)
    expected = numpy_eigenscore(z)
    estimate = efficient_eigenscore(z, seed=0, method="slq", return_info=True)
    assert estimate.method == "slq"
    assert estimate.score.item() == pytest.approx(expected, rel=1e-2)


def test_efficient_eigenscore__power_law_spectrum_against_its_formula():
    eigenvalues = torch.arange(1, 400, dtype=torch.float64) ** -1.5
    z = with_spectrum(eigenvalues, num_rows=400, d=900).float()
    expected = (torch.log(eigenvalues + ALPHA).sum().item() + math.log(ALPHA)) / 400
    assert efficient_eigenscore(z, seed=1, method="slq").item() == pytest.approx(expected, rel=1e-2)


def test_efficient_eigenscore__rank_deficient_k_greater_than_d():
    # Rank 20 embeddings, K = 300 > d = 100: 280 zero eigenvalues, 79 of them on the probed 100 x 100 side.
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(300, 20, generator=generator) @ torch.randn(20, 100, generator=generator)
    expected = numpy_eigenscore(z)
    assert efficient_eigenscore(z, seed=0, method="slq").item() == pytest.approx(expected, rel=1e-2)


def test_efficient_eigenscore__auto_says_which_path_ran():
    small = efficient_eigenscore(family("gaussian", 300, 100), seed=0, return_info=True)
    assert (small.method, small.reason) == ("exact", "exact is cheaper")
    assert small.score.item() == pytest.approx(eigenscore(family("gaussian", 300, 100)).item(), rel=1e-6)

    tall = family("gaussian", 4000, 1600)
    estimate = efficient_eigenscore(tall, seed=0, return_info=True)
    assert (estimate.method, estimate.reason) == ("slq", "converged")
    assert estimate.score.item() == pytest.approx(eigenscore(tall).item(), rel=1e-2)
    assert 0 < estimate.std_error < 1e-2 * abs(estimate.score.item())

    # Square Marchenko-Pastur: so many probes and steps would be needed that the exact score is cheaper.
    square = family("gaussian", 1800, 1800)
    fallback = efficient_eigenscore(square, seed=0, return_info=True)
    assert (fallback.method, fallback.reason) == ("exact", "estimate would cost more than exact")


def test_efficient_eigenscore__is_reproducible_with_a_seed():
    z = family("outliers", 500, 256)
    first = efficient_eigenscore(z, seed=7, method="slq")
    assert efficient_eigenscore(z, seed=7, method="slq").item() == first.item()
    fixed = efficient_eigenscore(z, seed=7, method="slq", num_probes=8, num_moments=6, return_info=True)
    assert (fixed.num_probes, fixed.num_steps, fixed.reason) == (8, 6, "fixed settings")


def test_eigenscores__are_nan_for_non_finite_embeddings():
    z = family("gaussian", 300, 100)
    z[7, 3] = float("nan")
    assert math.isnan(eigenscore(z).item())
    for method in ("auto", "slq", "kpm"):
        assert math.isnan(efficient_eigenscore(z, seed=0, method=method).item())


def test_chebyshev_polynomials__equal_cos_m_arccos_x():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    values = chebyshev_polynomials(x, 40)
    expected = torch.cos(torch.arange(41, dtype=torch.float64)[:, None] * torch.arccos(x))
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-10)


def test_jackson_damping__starts_at_one_and_decays_to_near_zero():
    g = jackson_damping(64)
    assert g[0].item() == pytest.approx(1.0, abs=1e-12)
    assert (g[1:] <= g[:-1]).all() and 0 < g[-1] < 1e-2


@pytest.mark.parametrize(
    ("name", "num_rows", "d"), [("gaussian", 300, 500), ("outliers", 400, 200), ("power-law", 100, 300)]
)
def test_spectral_upper_bound__is_at_least_lambda_max(name, num_rows, d):
    z = family(name, num_rows, d)
    lambda_max = torch.linalg.eigvalsh(torch.from_numpy(np.cov(z.double().numpy())))[-1].item()
    for seed in range(5):
        bound = spectral_upper_bound(z, seed=seed)
        assert lambda_max <= bound <= 1.5 * lambda_max


def test_efficient_eigenscore__kpm_on_a_well_conditioned_matrix():
    z = family("gaussian", 500, 256)
    estimate = efficient_eigenscore(z, seed=0, method="kpm", num_moments=60, return_info=True)
    assert (estimate.method, estimate.num_steps) == ("kpm", 60)
    assert estimate.score.item() == pytest.approx(numpy_eigenscore(z), rel=1e-2)


def _questions(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(k, d, generator=generator) for k, d in [(10, 64), (10, 64), (4, 32), (12, 8), (10, 64)]]


def test_eigenscore_metric__is_the_mean_of_per_question_scores():
    questions = _questions()
    expected = sum(numpy_eigenscore(q) for q in questions) / len(questions)
    one_by_one, batched = EigenScore(), EigenScore()
    for question in questions:
        one_by_one.update(question)
    batched.update(torch.stack([questions[0], questions[1], questions[4]]))
    batched.update(questions[2:4])
    assert one_by_one.compute().item() == pytest.approx(expected, rel=1e-5)
    assert batched.compute().item() == pytest.approx(expected, rel=1e-5)


def test_efficient_eigenscore_metric__draws_probes_from_one_seeded_generator():
    questions = [family("gaussian", 200, 100, seed) for seed in range(3)]
    metric = EfficientEigenScore(seed=5, method="slq", num_probes=16)
    metric.update(questions)
    generator = torch.Generator().manual_seed(5)
    scores = [efficient_eigenscore(q, seed=generator, method="slq", num_probes=16).item() for q in questions]
    assert metric.compute().item() == pytest.approx(sum(scores) / 3, rel=1e-6)


def test_eigenscore_metric__reduces_sum_and_count_across_ranks_in_process():
    # Two "ranks" with 3 and 2 questions; the gather that torchmetrics calls in compute() returns both ranks'
    # states, as torch.distributed's all_gather would.
    ranks = [EigenScore(distributed_available_fn=lambda: True) for _ in range(2)]
    for rank, metric in enumerate(ranks):
        metric.update(_questions()[rank::2])
    names = {id(getattr(ranks[0], name)): name for name in ("score_sum", "num_questions")}
    ranks[0].dist_sync_fn = lambda tensor, group=None: [getattr(metric, names[id(tensor)]) for metric in ranks]
    expected = sum(numpy_eigenscore(q) for q in _questions()) / 5
    assert ranks[0].compute().item() == pytest.approx(expected, rel=1e-5)
    assert ranks[0].num_questions.item() == 3  # unsynced again after compute


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        metric = EigenScore()
        metric.update(_questions()[rank::world_size])
        torch.save(metric.compute(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


# DDP: two spawned processes import torch and torchmetrics: ~10 s on 2 cores
def test_eigenscore_metric__reduces_sum_and_count_across_two_gloo_ranks(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn")
    expected = sum(numpy_eigenscore(q) for q in _questions()) / 5  # 3 questions on rank 0, 2 on rank 1
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt").item() == pytest.approx(expected, rel=1e-5)


def test_exact_match__squad_normalisation():
    assert exact_match("The Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("U.S.A.", ["usa"]) == 1.0
    assert exact_match("an apple", ["Apple", "pear"]) == 1.0
    assert exact_match("Anne", "ne") == 0.0  # articles go only as whole words
    assert exact_match("Eiffel", ["Eiffel Tower", "the tower"]) == 0.0


def test_token_f1__partial_overlap_by_hand():
    # {big, red, dog} vs {red, dog, barked}: 2 common, precision = recall = 2/3.
    assert token_f1("the big red dog", "a red dog barked") == pytest.approx(2 / 3, rel=1e-6)
    # 4 predicted tokens, 1 gold: P = 1/4, R = 1, F1 = 2 * 1/4 / (5/4) = 0.4; the best of several answers counts.
    assert token_f1("Paris is in France", ["Lyon", "Paris"]) == pytest.approx(0.4, rel=1e-6)
    assert token_f1("blue", ["red", "green"]) == 0.0
    with pytest.raises(ValueError, match="no gold answers"):
        token_f1("anything", [])


def test_truthfulqa_closer_to_correct__hand_case():
    correct = ["Nothing in particular happens if you crack your knuckles"]
    incorrect = ["You will get arthritis if you crack your knuckles"]
    truthful = "Nothing happens if you crack your knuckles"
    # 7 tokens; vs correct (9 tokens): 7 common, F1 = 2 * 1 * 7/9 / (16/9) = 0.875; vs incorrect: if, you, crack,
    # your, knuckles common, P = 5/7, R = 5/9, F1 = 0.625.
    assert token_f1(truthful, correct) == pytest.approx(0.875, rel=1e-6)
    assert token_f1(truthful, incorrect) == pytest.approx(0.625, rel=1e-6)
    assert truthfulqa_closer_to_correct(truthful, correct, incorrect)
    assert not truthfulqa_closer_to_correct("You will get arthritis", correct, incorrect)


def test_auroc__ranks_raw_scores_without_any_squashing():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    # Raw EigenScores far outside [0, 1]: a sigmoid would tie them all at 1.0 in float32 and give 0.5.
    assert auroc([100.0, 200.0, 300.0, 400.0], [False, True, False, True]) == pytest.approx(0.75)
