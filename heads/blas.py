"""One BLAS thread for scipy's own OpenBLAS while an optimiser alternates with numpy's.

pip wheels of numpy and scipy each bundle an OpenBLAS with its own thread pool. L-BFGS
(``scipy.optimize``) calls scipy's BLAS for its small vector updates between numpy's matrix
products in the loss; each pool's idle threads spin-wait for work, so on a small machine the
two pools fight over the cores and a 0.02 s fit takes 0.4 s (measured: 2 cores, numpy 2.4,
scipy 1.17, 800 x 1024 features). scipy's part works on vectors of the parameters' length, so
one thread loses nothing; numpy keeps every thread for the products that matter. Where both
share one BLAS (conda, system packages) nothing is limited.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path


@functools.cache
def _scipy_only_blas() -> tuple[str, ...]:
    """File paths of BLAS libraries that scipy bundles apart from numpy's (empty when shared)."""
    import numpy
    import scipy
    import scipy.optimize  # noqa: F401  (loads scipy's BLAS)
    from threadpoolctl import threadpool_info

    numpy_dir = Path(numpy.__file__).resolve().parent.parent
    scipy_dir = Path(scipy.__file__).resolve().parent
    mine: list[str] = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        path = Path(info["filepath"]).resolve()
        bundled = path.parent.name == "scipy.libs" or scipy_dir in path.parents
        if bundled and not path.is_relative_to(numpy_dir / "numpy.libs"):
            mine.append(str(path))
    return tuple(mine)


@contextlib.contextmanager
def scipy_blas_single_thread() -> Iterator[None]:
    """Within the block, scipy's bundled BLAS (if separate from numpy's) runs on one thread."""
    paths = _scipy_only_blas()
    if not paths:
        yield
        return
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    selected = [lib for lib in controller.lib_controllers if str(Path(lib.filepath).resolve()) in paths]
    before = [lib.num_threads for lib in selected]
    for lib in selected:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(selected, before):
            lib.set_num_threads(n)
