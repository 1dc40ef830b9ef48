"""The public API is exactly ``__all__``: sorted, complete, and shown as ``lmstream_nb.X``."""

from __future__ import annotations

import lmstream_nb


def test_all_is_sorted_and_unique() -> None:
    assert list(lmstream_nb.__all__) == sorted(set(lmstream_nb.__all__))


def test_every_public_name_is_exported() -> None:
    public = {name for name in dir(lmstream_nb) if not name.startswith("_")}
    subpackages_and_modules = {"bench", "cli", "serve", "simulator", "load_ipython_extension"}
    assert public - subpackages_and_modules - {"contextlib"} == set(lmstream_nb.__all__)


def test_exported_classes_claim_the_package() -> None:
    for name in lmstream_nb.__all__:
        obj = getattr(lmstream_nb, name)
        if isinstance(obj, type):
            assert obj.__module__ == "lmstream_nb", name


def test_every_error_derives_from_lmstreamerror() -> None:
    for name in lmstream_nb.__all__:
        obj = getattr(lmstream_nb, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, lmstream_nb.LMStreamError), name
