"""`SynthesisConfig`: the parameters of one synthesis call, validated in one place.

The field names are the CLI option names of ``npos synthesize`` and ``npos train-head``
(``--k``, ``--select``, ...), and ``dataclasses.asdict(config)`` is what derived stores and
checkpoints record.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from npos.knn import KNN_BACKENDS as BACKENDS  # noqa: F401 - old name, for CLI choices
from npos.knn import backend_names
from npos.validation import check_choice, check_float, check_int

METHODS = ("npos", "vos", "gaussian")
NOISE_SPACES = ("sphere", "raw")
#: Where offline synthesis takes its banks: a seeded ``--queue`` sample per class (the paper)
#: or every valid row.
BANKS = ("sample", "all")
#: Per class (labels needed) or class-agnostic over the whole store (labels ignored).
SCOPES = ("class", "global")

#: The sigma used when ``sigma=None``, per noise space. ``raw`` 0.1 is the paper's value for
#: CLIP ViT-B/16 (embedding norm ~10, D=512): a relative perturbation of
#: 0.1 * sqrt(512) / 10 ~ 0.23, which is ``sphere`` sigma 0.23 / sqrt(512) ~ 0.01.
DEFAULT_SIGMA = {"sphere": 0.01, "raw": 0.1}


@dataclass(frozen=True)
class SynthesisConfig:
    """Parameters of outlier synthesis (see the design's "NPOS synthesis").

    Parameters
    ----------
    method : {"npos", "vos", "gaussian"}
        ``npos``: boundary selection + Gaussian sampling + kNN rejection (the paper).
        ``vos``: class-conditional Gaussians with a shared covariance; of ``pick *
        candidates`` samples per class keep the ``pick * keep`` least likely. ``gaussian``:
        noise around ``pick`` uniformly drawn bank points, ``keep`` draws each, no selection
        and no rejection. Every method returns ``pick * keep`` outliers per ready class.
    k : int
        K of the K-th-nearest-neighbour distance; ``1 <= k < Q`` (a bank point's K-th nearest
        *other* point).
    select : int
        Size of the boundary set: the bank points with the largest K-th-NN distance
        (``npos`` only); ``pick <= select <= Q``.
    pick : int
        Boundary points (``npos``) or bank points (``gaussian``) drawn per class and call.
    candidates : int
        Gaussian candidates sampled around each picked point (``npos``), or per picked slot
        (``vos``: ``pick * candidates`` samples per class).
    sigma : float or None
        Noise std. ``None`` means the noise space's default: 0.01 for ``sphere``, 0.1 for
        ``raw`` (see :data:`DEFAULT_SIGMA` for how they correspond). Not used by ``vos``.
    noise_space : {"sphere", "raw"}
        ``sphere``: ``|b| * normalize(b/|b| + sigma * eps)``, sigma is a per-dimension std on
        unit vectors and outliers keep their source point's norm. ``raw`` (the paper's code):
        ``b + sigma * eps`` on the un-normalized embedding.
    keep : int
        Candidates kept per picked point: those with the largest K-th-NN distance to the
        class bank (``npos``); noise draws per picked point (``gaussian``); ``keep <=
        candidates``.
    backend : str
        kNN backend (:mod:`npos.knn`): ``"auto"``, ``"torch"``, ``"faiss-flat"``,
        ``"faiss-ivf"`` or any name added with :func:`npos.knn.register_backend`. ``torch``
        is the batched exact engine over all classes at once; the others run one
        :class:`~npos.knn.KnnIndex` per class (faiss: for banks too large for a (Q, Q)
        product). ``auto`` is :func:`npos.knn.resolve_knn_backend` for the per-class bank
        size.
    """

    method: str = "npos"
    k: int = 400
    select: int = 300
    pick: int = 3
    candidates: int = 1500
    sigma: float | None = None
    noise_space: str = "sphere"
    keep: int = 2
    backend: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def resolved_sigma(self) -> float:
        """The sigma actually used: ``sigma``, or the noise space's default when it is None."""
        return DEFAULT_SIGMA[self.noise_space] if self.sigma is None else float(self.sigma)

    def validate(self, bank_size: int | None = None) -> None:
        """Raise :class:`~npos.errors.ParameterError` for the first invalid parameter.

        Without ``bank_size`` only checks that do not depend on the bank run (they also run
        at construction); with it, the bounds that involve the per-class bank size Q too.
        """
        check_choice("method", self.method, METHODS)
        check_choice("noise_space", self.noise_space, NOISE_SPACES)
        check_choice("backend", self.backend, backend_names())
        check_int("k", self.k, 1)
        check_int("pick", self.pick, 1)
        check_int("candidates", self.candidates, 1)
        check_int("keep", self.keep, 1)
        check_int("select", self.select, 1)
        check_float("sigma", self.sigma, 0.0, low_open=True, allow_none=True)
        if self.method == "npos":
            check_int("pick", self.pick, 1, self.select, why=" (pick <= select)")
        if self.method in ("npos", "vos"):
            check_int("keep", self.keep, 1, self.candidates, why=" (keep <= candidates)")
        if bank_size is None:
            return
        check_int("bank size", bank_size, 2, why=" (points per class bank)")
        check_int("k", self.k, 1, bank_size, high_closed=False,
                   why=f" (k < bank size {bank_size}: the K-th nearest other point)")
        if self.method == "npos":
            check_int("select", self.select, self.pick, bank_size,
                       why=f" (pick <= select <= bank size {bank_size})")
        if self.method == "gaussian":
            check_int("pick", self.pick, 1, bank_size, why=f" (pick <= bank size {bank_size})")

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``resolved_sigma``, for store attributes and ``config.json``."""
        return {**asdict(self), "resolved_sigma": self.resolved_sigma}
