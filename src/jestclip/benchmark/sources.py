"""Where the benchmark's raw material lives, which packages ship it, and how to install them.

Everything comes from the Debian and npm registries; nothing is downloaded at build time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DEBIAN_PACKAGES",
    "HELDOUT_THEMES",
    "NPM_PACKAGES",
    "TRAIN_THEMES",
    "SourcePaths",
    "debian_licence",
    "install_sources",
    "missing_sources",
]

# Icon theme directory -> Debian package. Held-out themes are whole families never seen in training.
TRAIN_THEMES: dict[str, str] = {
    "Papirus": "papirus-icon-theme",
    "Adwaita": "adwaita-icon-theme",
    "Numix": "numix-icon-theme",
    "elementary": "elementary-icon-theme",
    "elementary-xfce": "elementary-xfce-icon-theme",
    "Moka": "moka-icon-theme",
    "Faba": "faba-icon-theme",
    "Paper": "paper-icon-theme",
    "Obsidian": "obsidian-icon-theme",
    "Faenza": "faenza-icon-theme",
    "bloom": "deepin-icon-theme",
    "mate": "mate-icon-theme",
    "nuoveXT2": "lxde-icon-theme",
    "gnome": "gnome-icon-theme",
    "hicolor": "hicolor-icon-theme",
}
HELDOUT_THEMES: dict[str, str] = {
    "Tango": "tango-icon-theme",
    "oxygen": "oxygen-icon-theme",
    "breeze": "breeze-icon-theme",
    "Yaru": "yaru-theme-icon",
}

DEBIAN_PACKAGES: tuple[str, ...] = (
    "openclipart-svg",
    "fonts-noto-color-emoji",
    "unicode-data",
    "unicode-cldr-core",
    "ruby-gemojione",
    "tuxpaint-stamps-default",
    "wamerican",
    *TRAIN_THEMES.values(),
    *HELDOUT_THEMES.values(),
)
NPM_PACKAGES: dict[str, str] = {"@twemoji/svg": "15.0.0", "openmoji": "15.1.0"}


def default_npm_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("JESTCLIP_NPM_ROOT", cache / "jestclip" / "npm"))


@dataclass(frozen=True)
class SourcePaths:
    """Filesystem locations of every source (defaults: where the Debian packages install)."""

    openclipart: Path = Path("/usr/share/openclipart/svg")
    icons: Path = Path("/usr/share/icons")
    noto_font: Path = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
    emoji_test: Path = Path("/usr/share/unicode/emoji/emoji-test.txt")
    cldr_annotations: tuple[Path, ...] = (
        Path("/usr/share/unicode/cldr/common/annotations/en.xml"),
        Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml"),
    )
    gemojione: Path = Path("/usr/share/rubygems-integration/all/gems/gemojione-3.3.0")
    tuxpaint: Path = Path("/usr/share/tuxpaint/stamps")
    words: Path = Path("/usr/share/dict/words")
    npm_root: Path = field(default_factory=default_npm_root)

    @property
    def twemoji(self) -> Path:
        return self.npm_root / "node_modules" / "@twemoji" / "svg"

    @property
    def openmoji(self) -> Path:
        return self.npm_root / "node_modules" / "openmoji"

    def required(self) -> dict[str, list[Path]]:
        """Paths each source needs, by source name."""
        return {
            "openclipart": [self.openclipart, self.words],
            "icons": [self.icons / theme for theme in (*TRAIN_THEMES, *HELDOUT_THEMES)],
            "emoji": [
                self.noto_font,
                self.emoji_test,
                *self.cldr_annotations,
                self.gemojione / "config" / "index.json",
                self.twemoji,
                self.openmoji / "data" / "openmoji.json",
            ],
            "tuxpaint": [self.tuxpaint],
        }


def missing_sources(paths: SourcePaths, sources: list[str]) -> dict[str, list[Path]]:
    """Missing paths of the named sources (empty when everything is installed)."""
    required = paths.required()
    unknown = [s for s in sources if s not in required]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {sorted(required)}")
    return {s: missing for s in sources if (missing := [p for p in required[s] if not p.exists()])}


def install_sources(npm_root: Path, *, dry_run: bool = False) -> list[list[str]]:
    """Install the Debian packages (apt-get, needs root) and the npm packages (into ``npm_root``).

    Returns the commands run (or that would run, with ``dry_run``).
    """
    apt = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]
    npm = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(npm_root)]
    npm += [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
    commands = [apt, npm]
    if dry_run:
        return commands
    if os.geteuid() != 0:
        raise PermissionError("installing Debian packages needs root; run: sudo " + " ".join(apt))
    for tool in ("apt-get", "npm"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is not on PATH; it is needed to install the benchmark's sources")
    if not list(Path("/var/lib/apt/lists").glob("*Packages*")):
        subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(apt, check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    npm_root.mkdir(parents=True, exist_ok=True)
    subprocess.run(npm, check=True)
    return commands


def debian_licence(package: str, doc_root: Path = Path("/usr/share/doc")) -> str:
    """The ``License:`` of the ``Files: *`` stanza of a Debian copyright file ("unknown" if none)."""
    path = doc_root / package / "copyright"
    if not path.exists():
        return "unknown"
    text = path.read_text(encoding="utf-8", errors="replace")
    for stanza in re.split(r"\n\s*\n", text):
        if re.search(r"^Files:\s*\*\s*$", stanza, re.MULTILINE):
            match = re.search(r"^License:\s*(.+)$", stanza, re.MULTILINE)
            if match:
                return match.group(1).strip()
    match = re.search(r"^License:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"
