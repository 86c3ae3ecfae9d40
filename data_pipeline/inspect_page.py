"""What ``mmfuse inspect`` writes: images and audio strips per sample, the contact sheet, summary plots, index.html
and samples.json.

Everything that comes from the data is treated as hostile. Captions, keys, origins and json are HTML-escaped. A file
name is the sample's position and its key reduced to ``[A-Za-z0-9._-]``, so no key can name a path outside the
output folder. Only what decodes is written: an image is decoded (after a pixel-count check) and written as it is
only when it is a JPEG, PNG or WebP no larger than ``page_image_size``, else re-encoded; a clip is written as the FLAC
of its decoded first ``audio_seconds``. Nothing from the data reaches a shell or a file path unsanitised.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from data_pipeline.config import InspectConfig
from mmfuse.redact import redact
from mmfuse.storage import filesystem, is_local, join, write_bytes

if TYPE_CHECKING:  # the drawing comes from inspect.py, which imports this module when it renders
    from data_pipeline.inspect import Drawn

PAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
SHEET_COLUMNS = 8
CAPTION_LINES = 2
N_MELS = 64
META_CHARS = 2000  # json shown per sample; the rest is cut


@dataclass
class Shown:
    """One sample as the page shows it (also a row of samples.json)."""

    key: str
    origin: str
    caption: str | None
    image: str | None = None
    """File under the output folder (images/...)."""
    width: int | None = None
    height: int | None = None
    audio: str | None = None
    audio_strip: str | None = None
    audio_seconds: float | None = None
    problems: list[str] = field(default_factory=list)


def shows_something(item: Shown) -> bool:
    """Whether the page shows any of the sample: an image or a clip that decoded, or a caption."""
    return bool(item.image or item.audio or item.caption)


def safe_name(position: int, key: str) -> str:
    """A file name for a sample: unique (its position first) and unable to leave its folder (``../x`` → ``000-x``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80].strip("._") or "sample"
    return f"{position:03d}-{cleaned}"


def short(text: str | None, limit: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """The decoded image; ValueError with the reason when it is not one or claims more than ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            raise ValueError(f"{image.width}x{image.height} is over max_image_pixels")
        image.load()
    except ValueError:
        raise
    except Exception as err:  # Pillow raises many types on bad data (OSError, SyntaxError, DecompressionBombError)
        raise ValueError(f"does not decode ({type(err).__name__})") from None
    return image


def page_image(image: Image.Image, data: bytes, max_side: int) -> tuple[bytes, str]:
    """The bytes and extension the page shows: the original when small and in a format every browser reads."""
    ext = PAGE_FORMATS.get(image.format or "")
    if ext and max(image.size) <= max_side:
        return data, ext
    copy = rgb(image)
    copy.thumbnail((max_side, max_side))
    out = io.BytesIO()
    copy.save(out, format="JPEG", quality=90)
    return out.getvalue(), "jpg"


def rgb(image: Image.Image) -> Image.Image:
    """RGB, transparency on white."""
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def decode_audio(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    """Mono float32 samples of the clip's first ``max_seconds``, and its rate; ValueError when it does not decode."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as clip:
            wave = clip.read(frames=int(max_seconds * clip.samplerate), dtype="float32", always_2d=True)
            rate = clip.samplerate
    except Exception as err:  # libsndfile's errors, and whatever a malformed header makes it raise
        raise ValueError(f"does not decode ({type(err).__name__})") from None
    if not len(wave):
        raise ValueError("holds no samples")
    return wave.mean(axis=1), rate


def log_mel(wave: np.ndarray, rate: int) -> np.ndarray:
    """``[N_MELS, frames]`` natural-log mel power (HTK scale, 25 ms Hann windows), in numpy: the training front end
    (data_pipeline/loader/melspec.py) is torch, which this stage does not import. At most ~1,000 frames."""
    n_fft = 2 ** max(6, round(math.log2(rate * 0.025)))
    wave = np.pad(wave, (0, max(0, n_fft - len(wave))))
    hop = max(rate // 100, (len(wave) - n_fft) // 1000 + 1)
    frames = 1 + (len(wave) - n_fft) // hop
    windows = wave[np.arange(n_fft)[None] + hop * np.arange(frames)[:, None]] * np.hanning(n_fft).astype(np.float32)
    power = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    return np.log(np.maximum(_mel_filters(rate, n_fft) @ power.T, 1e-10))


@functools.lru_cache(maxsize=8)
def _mel_filters(rate: int, n_fft: int) -> np.ndarray:
    """``[N_MELS, n_fft // 2 + 1]`` triangular filters, evenly spaced on the mel scale from 0 to rate / 2."""
    top = 2595.0 * np.log10(1.0 + rate / 2 / 700.0)
    edges = 700.0 * (10.0 ** (np.linspace(0, top, N_MELS + 2) / 2595.0) - 1.0)
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    return np.clip(np.minimum((bins - lower) / (center - lower), (upper - bins) / (upper - center)), 0, None)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


MAGMA = np.array([(0, 0, 4), (59, 15, 112), (140, 41, 129), (222, 73, 104), (254, 159, 109), (252, 253, 191)], np.float64)
"""Anchor colours of the mel strip's colour map (matplotlib's magma, coarsely): silence dark, loud bright."""
STRIP_WIDTH, WAVE_HEIGHT, MEL_SCALE = 600, 56, 2
WAVE_COLOUR = np.array([31, 78, 121], np.uint8)


def audio_strip(title: str, wave: np.ndarray, rate: int) -> bytes:
    """PNG: a title line, the waveform (min/max per pixel column) and the log-mel spectrogram (80 dB range, low
    frequencies at the bottom) on one time axis. Drawn with Pillow: a matplotlib figure per clip costs ~0.3 s."""
    font, line = _font(11), 16
    mel_height = N_MELS * MEL_SCALE
    strip = Image.new("RGB", (STRIP_WIDTH, line + WAVE_HEIGHT + mel_height + line), "white")
    draw = ImageDraw.Draw(strip)
    seconds = len(wave) / rate
    _text(draw, (4, 2), f"{title}  ({seconds:.2f} s, {rate} Hz)", font, STRIP_WIDTH - 8)
    # The waveform as one array: each pixel column filled between the lowest and highest sample it covers.
    edges = np.linspace(0, len(wave), STRIP_WIDTH + 1).astype(int)
    edges[1:] = np.maximum(edges[1:], edges[:-1] + 1)
    clipped = np.clip(np.pad(wave, (0, max(0, edges[-1] - len(wave)))), -1, 1)
    half = WAVE_HEIGHT / 2 - 2
    top = np.floor(WAVE_HEIGHT / 2 - np.maximum.reduceat(clipped, edges[:-1]) * half)
    bottom = np.ceil(WAVE_HEIGHT / 2 - np.minimum.reduceat(clipped, edges[:-1]) * half)
    rows = np.arange(WAVE_HEIGHT)[:, None]
    inked = (rows >= top[None]) & (rows <= bottom[None])
    strip.paste(Image.fromarray(np.where(inked[..., None], WAVE_COLOUR, 255).astype(np.uint8)), (0, line))
    mel = log_mel(wave, rate)
    level = np.clip((mel - (mel.max() - 18.42)) / 18.42, 0, 1)  # 18.42 = ln(1e8): 80 dB below the loudest bin
    position = level * (len(MAGMA) - 1)
    low = np.minimum(position.astype(int), len(MAGMA) - 2)
    colours = MAGMA[low] + (MAGMA[low + 1] - MAGMA[low]) * (position - low)[..., None]
    picture = Image.fromarray(colours[::-1].astype(np.uint8)).resize((STRIP_WIDTH, mel_height), Image.BILINEAR)
    strip.paste(picture, (0, line + WAVE_HEIGHT))
    bottom = line + WAVE_HEIGHT + mel_height + 2
    _text(draw, (2, bottom), "0 s", font, 60, fill="#555")
    end = f"{seconds:.2f} s"
    _text(draw, (STRIP_WIDTH - 4 - int(draw.textlength(end, font=font)), bottom), end, font, 80, fill="#555")
    _text(draw, (STRIP_WIDTH // 2 - 60, bottom), f"log-mel, {N_MELS} bands", font, 140, fill="#555")
    out = io.BytesIO()
    strip.save(out, format="PNG", compress_level=1)  # a spectrogram's noise hardly compresses: level 6 costs 4x the time
    return out.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):  # Pillow built without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, width: int, fill: str = "#222") -> None:
    """One line of ``text`` cut to ``width`` pixels; characters the font cannot encode become '?'."""
    while len(text) > 1 and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    try:
        draw.text(xy, text, font=font, fill=fill)
    except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
        draw.text(xy, text.encode("latin-1", "replace").decode("latin-1"), font=font, fill=fill)


def contact_sheet(cells: list[tuple[Image.Image | None, str, str]], side: int) -> bytes:
    """PNG: one cell per sample, its picture (image, else audio strip, else grey) scaled to fit ``side`` over its key
    and caption."""
    font = _font(11)
    line = 14
    columns = min(SHEET_COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    cell_w, cell_h = side + 8, side + 8 + line * (1 + CAPTION_LINES)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (picture, key, caption) in enumerate(cells):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        if picture is None:
            draw.rectangle((x, y, x + side - 1, y + side - 1), fill="#dddddd")
        else:
            thumb = ImageOps.contain(rgb(picture), (side, side))  # a 16-pixel image is shown at cell size too
            sheet.paste(thumb, (x + (side - thumb.width) // 2, y + (side - thumb.height) // 2))
        _text(draw, (x, y + side + 2), key, font, side, fill="#555")
        words, lines = short(caption, 400).split(), []
        while words and len(lines) < CAPTION_LINES:
            taken = 1
            while taken < len(words) and draw.textlength(" ".join(words[: taken + 1]), font=font) <= side:
                taken += 1
            cut = len(lines) == CAPTION_LINES - 1 and taken < len(words)
            lines.append(" ".join(words[:taken]) + (" …" if cut else ""))
            words = words[taken:]
        for j, text in enumerate(lines):
            _text(draw, (x, y + side + 2 + line * (j + 1)), text, font, side)
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def summary_plots(drawn: Drawn, shown: list[Shown], metas: list[dict | None]) -> dict[str, tuple[bytes, str]]:
    """``{file name: (PNG, caption)}``: caption lengths, image sizes and aspect ratios, modality coverage, samples
    per shard and failure reasons."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    plots = {}
    n = len(shown)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    lengths = [len(s.caption) for s in shown if s.caption]
    if lengths:
        ax.hist(lengths, bins=min(30, max(5, len(set(lengths)))), color="#4c72b0")
        ax.set_xlabel("characters")
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        _empty(ax, "no captions among the drawn samples")
    ax.set_title(f"caption length ({len(lengths)} of {n} drawn have one)", fontsize=10)
    plots["caption_lengths.png"] = (_png(fig), "Caption length in characters, drawn samples.")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    sizes = [(s.width, s.height) for s in shown if s.width]
    originals = [(m.get("original_width"), m.get("original_height")) for m in metas if isinstance(m, dict)]
    originals = [(w, h) for w, h in originals if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0]
    if sizes:
        if originals:
            left.scatter(*zip(*originals), s=12, alpha=0.5, color="#dd8452", label="original (json)")
        left.scatter(*zip(*sizes), s=12, alpha=0.7, color="#4c72b0", label="stored")
        left.set_xlabel("width")
        left.set_ylabel("height")
        left.legend(fontsize=7)
        right.hist([w / h for w, h in sizes], bins=20, color="#4c72b0")
        right.set_xlabel("aspect ratio (width / height)")
        right.set_ylabel("samples")
    else:
        _empty(left, "no images among the drawn samples")
        _empty(right, "")
    left.set_title("image size (pixels)", fontsize=10)
    right.set_title("aspect ratio", fontsize=10)
    plots["image_sizes.png"] = (_png(fig), "Image sizes and aspect ratios of the drawn samples (stored, and the "
                                "originals where the sample's json records them).")

    fig, ax = plt.subplots(figsize=(5, 3.2))
    have = {"image": sum(s.image is not None for s in shown), "text": sum(bool(s.caption) for s in shown),
            "audio": sum(s.audio is not None for s in shown), "json": sum(m is not None for m in metas)}
    ax.bar(list(have), [100 * v / max(1, n) for v in have.values()], color="#55a868")
    for i, v in enumerate(have.values()):
        ax.text(i, 100 * v / max(1, n) + 1, str(v), ha="center", fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of drawn samples")
    ax.set_title("modality coverage", fontsize=10)
    plots["modalities.png"] = (_png(fig), "Share of the drawn samples with each modality (readable ones).")

    if drawn.shard_counts:
        fig, ax = plt.subplots(figsize=(9, 3.2))
        names, counts = list(drawn.shard_counts), list(drawn.shard_counts.values())
        opened = set(drawn.opened)
        colours = ["#c44e52" if name in opened else "#8c8c8c" for name in names]
        ax.bar(range(len(names)), counts, width=0.8 if len(names) <= 100 else 1.0, color=colours)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"shard (of {len(names)}; red: drawn from)")
        ax.set_ylabel("samples")
        ax.set_title(f"samples per shard (index: {drawn.total} in all)", fontsize=10)
        plots["shard_counts.png"] = (_png(fig), "Samples per shard from the dataset's index; the red shards are the "
                                     "ones drawn from.")

    fig, ax = plt.subplots(figsize=(7, max(2.4, 0.3 * min(20, len(drawn.failures)) + 1.2)))
    if drawn.failures:
        top = drawn.failures.most_common(20)
        ax.barh(range(len(top)), [count for _, count in top], color="#c44e52")
        ax.set_yticks(range(len(top)), [short(reason, 40) for reason, _ in top], fontsize=8, parse_math=False)
        ax.invert_yaxis()
        ax.set_xlabel("samples")
    else:
        _empty(ax, "no failures recorded")
    ax.set_title(f"failure reasons ({drawn.failures_from})", fontsize=10)
    plots["failures.png"] = (_png(fig), f"Failure reasons from {drawn.failures_from}.")
    return plots


def render(cfg: InspectConfig, drawn: Drawn) -> tuple[dict[str, bytes], list[Shown]]:
    """Every file of the page but index.html and samples.json, by path under the output folder, and what it shows."""
    files: dict[str, bytes] = {}
    shown: list[Shown] = []
    cells: list[tuple[Image.Image | None, str, str]] = []
    for position, sample in enumerate(drawn.samples):
        name = safe_name(position, sample.key)
        item = Shown(sample.key, sample.origin, sample.caption, problems=list(sample.problems))
        picture = None
        if sample.image is not None:
            try:
                picture = decode_image(sample.image, cfg.max_image_pixels)
                data, ext = page_image(picture, sample.image, cfg.page_image_size)
                item.image, item.width, item.height = f"images/{name}.{ext}", picture.width, picture.height
                files[item.image] = data
            except ValueError as err:
                item.problems.append(f"image: {err}")
                picture = None
        if sample.audio is not None:
            try:
                wave, rate = decode_audio(sample.audio, cfg.audio_seconds)
            except ValueError as err:
                item.problems.append(f"audio: {err}")
            else:
                import soundfile

                clip = io.BytesIO()
                soundfile.write(clip, wave, rate, format="FLAC", subtype="PCM_16")
                item.audio, item.audio_strip = f"audio/{name}.flac", f"audio/{name}.png"
                item.audio_seconds = round(len(wave) / rate, 3)
                files[item.audio] = clip.getvalue()
                files[item.audio_strip] = audio_strip(short(sample.key, 60), wave, rate)
                if picture is None:
                    picture = Image.open(io.BytesIO(files[item.audio_strip]))
        shown.append(item)
        cells.append((picture, short(sample.key, 40), sample.caption or ("" if shows_something(item) else "(unreadable)")))
    files["contact_sheet.png"] = contact_sheet(cells, cfg.thumb_size)
    return files, shown


def page(cfg: InspectConfig, drawn: Drawn, shown: list[Shown], plots: dict[str, tuple[bytes, str]],
         metas: list[dict | None]) -> str:
    e = html.escape
    listed = ", ".join(drawn.opened[:10]) + (", …" if len(drawn.opened) > 10 else "")
    where = f"{len(drawn.opened)} of {len(drawn.shard_counts)} shards ({listed})"
    if drawn.layout == "manifest":
        where = "the manifest"
    readable = sum(map(shows_something, shown))
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        # Defence in depth: the page runs no script, so none injected through the data can run either.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"script-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'\">",
        f"<title>mmfuse inspect: {e(redact(cfg.path))}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;color:#222}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}"
        "figure{margin:0;padding:8px;border:1px solid #ddd;background:#fafafa;overflow-wrap:anywhere}"
        "figure img{max-width:100%}audio{width:100%}code{font-size:85%}.problem{color:#b00020}"
        "pre{white-space:pre-wrap;font-size:75%;max-height:20em;overflow:auto}.sheet{max-width:100%}"
        "td,th{padding:2px 12px;text-align:left;border-bottom:1px solid #eee}</style>",
        "</head><body>",
        f"<h1>{e(redact(cfg.path))}</h1>",
        f"<p>Layout: <b>{e(drawn.layout)}</b>. {drawn.total} samples by its index. {len(shown)} drawn with seed "
        f"{cfg.seed} from {e(where)}; {readable} readable.</p>",
        '<h2>Contact sheet</h2><img class="sheet" src="contact_sheet.png" alt="contact sheet of the drawn samples">',
        '<h2>Summary</h2><div class="grid">',
    ]
    for name, (_, caption) in plots.items():
        parts.append(f'<figure><img src="plots/{e(name)}" alt="{e(caption)}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</div>")
    if drawn.failures:
        rows = "".join(f"<tr><td>{e(reason)}</td><td>{count}</td></tr>" for reason, count in drawn.failures.most_common())
        parts.append(f"<h3>Failure reasons ({e(drawn.failures_from)})</h3><table><tr><th>reason</th><th>samples</th></tr>"
                     f"{rows}</table>")
    parts.append('<h2>Samples</h2><div class="grid">')
    for position, (item, meta) in enumerate(zip(shown, metas)):
        parts.append(f'<figure id="sample-{position}">')
        if item.image:
            parts.append(f'<img src="{e(item.image)}" alt="{e(short(item.caption, 200))}" loading="lazy">')
        if item.audio:
            parts.append(f'<img src="{e(item.audio_strip)}" alt="waveform and mel spectrogram" loading="lazy">')
            parts.append(f'<audio controls preload="none" src="{e(item.audio)}"></audio>')
        parts.append(f"<figcaption><code>{e(item.key)}</code> <small>{e(item.origin)}")
        if item.width:
            parts.append(f" &middot; {item.width}x{item.height}")
        if item.audio_seconds:
            parts.append(f" &middot; {item.audio_seconds:g} s")
        parts.append(f"</small><br>{e(item.caption) if item.caption else '<i>no caption</i>'}")
        for problem in item.problems:
            parts.append(f'<br><span class="problem">{e(problem)}</span>')
        if meta is not None:
            text = json.dumps(meta, indent=1, ensure_ascii=False, default=str)
            cut = text if len(text) <= META_CHARS else text[:META_CHARS] + "\n…"
            parts.append(f"<details><summary>json</summary><pre>{e(cut)}</pre></details>")
        parts.append("</figcaption></figure>")
    parts.append("</div>")
    if drawn.problems:
        parts.append("<h2>Problems</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in drawn.problems) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_page(cfg: InspectConfig, drawn: Drawn) -> tuple[dict[str, bytes], dict]:
    """Every file of the output folder by its path there, and what samples.json holds."""
    metas = [sample.meta for sample in drawn.samples]
    files, shown = render(cfg, drawn)
    plots = summary_plots(drawn, shown, metas)
    files.update({f"plots/{name}": png for name, (png, _) in plots.items()})
    summary = {
        "dataset": redact(cfg.path),
        "layout": drawn.layout,
        "seed": cfg.seed,
        "num_samples": cfg.num_samples,
        "total": drawn.total,
        "shards": len(drawn.shard_counts),
        "opened": drawn.opened,
        "shown": sum(map(shows_something, shown)),
        "failures": dict(drawn.failures.most_common()),
        "problems": drawn.problems,
        "samples": [asdict(item) for item in shown],
    }
    files["samples.json"] = json.dumps(summary, indent=1, ensure_ascii=False).encode()
    files["index.html"] = page(cfg, drawn, shown, plots, metas).encode()
    return files, summary


def write_files(url: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (path under ``url`` → bytes), each atomically; local folders are created."""
    fs, root = filesystem(url)
    if is_local(url):
        for folder in {"", *(path.rpartition("/")[0] for path in files)}:
            fs.makedirs(join(root, folder) if folder else root, exist_ok=True)
    for path, data in files.items():
        write_bytes(fs, join(root, path), data)
