"""Where the demo's raw material lives (files shipped inside installed packages) and how it
is encoded. Nothing here touches the network."""

from __future__ import annotations

import glob
import io
import os
from functools import cache, lru_cache
from importlib.util import find_spec

from PIL import Image, ImageFont

JPEG_QUALITY = 90  # fixed: the demo must be byte-identical on every build
# Import name -> the package (of the `demo` extra) whose shipped files the demo is built
# from. All are needed: with fewer the set would differ from build to build of the project.
DEMO_PACKAGES = {"skimage": "scikit-image", "sklearn": "scikit-learn",
                 "matplotlib": "matplotlib", "easy_vqa": "easy-vqa"}
INSTALL_DEMO = "pip install 'qwenvl-train[demo]'"


def require_demo_packages() -> None:
    """A ModuleNotFoundError naming every missing package and the extra to install."""
    missing = [dist for module, dist in DEMO_PACKAGES.items() if find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"the demo data set is built from files that ship in {', '.join(missing)}, "
            f"which {'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_DEMO}",
            name=missing[0])


def package_file(package: str, *parts: str) -> str | None:
    """Path of a file inside an installed package, or None when absent."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    return path if os.path.exists(path) else None


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False,
                           progressive=False, subsampling=0)
    return buf.getvalue()


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@cache
def latin_font_path() -> str:
    # matplotlib ships DejaVu Sans, so the demo never depends on system fonts for Latin.
    path = package_file("matplotlib", "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    if path is None:
        raise FileNotFoundError("DejaVuSans.ttf not found (is matplotlib installed?)")
    return path


@cache
def cjk_font_path() -> str | None:
    """A font with Chinese glyphs: the `pylopdf-fonts-zh-cn` package (Noto Sans SC, OFL),
    else a system WenQuanYi / Noto CJK font; None when there is none (no Chinese docs)."""
    path = package_file("pylopdf_fonts_zh_cn", "NotoSansSC-Regular.otf")
    if path:
        return path
    for pattern in ("/usr/share/fonts/**/wqy-microhei.ttc", "/usr/share/fonts/**/NotoSansCJK*"):
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    return None


@lru_cache(maxsize=64)
def font(size: int, cjk: bool = False) -> ImageFont.FreeTypeFont:
    path = cjk_font_path() if cjk else latin_font_path()
    if path is None:
        raise FileNotFoundError("no CJK font: pip install pylopdf-fonts-zh-cn")
    return ImageFont.truetype(path, size)
