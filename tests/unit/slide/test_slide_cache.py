"""The slide cache: local copies of slide objects, and a temporary cache that leaves
nothing behind."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from services.common.objectstore import open_store
from services.slide.slides import SlideCache


def test_a_slide_is_copied_once_and_a_kept_folder_stays(tmp_path: Path) -> None:
    with open_store((tmp_path / "store").as_uri()) as store:
        store.put_bytes("slides/a.tiff", b"not really a slide")
        cache = SlideCache.of(store, tmp_path / "cache")
        first = cache.local_path("slides/a.tiff")
        assert first.read_bytes() == b"not really a slide"
        assert cache.local_path("slides/a.tiff") == first
        del cache
        gc.collect()
    assert first.is_file()  # a folder the settings name is the user's


def test_a_temporary_cache_is_removed_with_it(tmp_path: Path) -> None:
    with open_store((tmp_path / "store").as_uri()) as store:
        store.put_bytes("slides/a.tiff", b"x")
        cache = SlideCache.temporary(store)
        folder = cache.folder
        assert cache.local_path("slides/a.tiff").is_file()
        del cache
        gc.collect()
    assert not folder.exists()


def test_a_temporary_cache_is_removed_when_the_process_exits(tmp_path: Path) -> None:
    code = (
        "import sys; from services.common.objectstore import open_store; "
        "from services.slide.slides import SlideCache; "
        f"store = open_store({(tmp_path / 'store').as_uri()!r}); "
        "store.put_bytes('slides/a.tiff', b'x'); "
        "cache = SlideCache.temporary(store); cache.local_path('slides/a.tiff'); "
        "print(cache.folder)"
    )
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    folder = Path(done.stdout.strip())
    assert folder.name.startswith("histomarker-slides-")
    assert not folder.exists()
