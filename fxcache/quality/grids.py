"""Image grids with a label per row (and optionally per column), for the demo, `fxcache eval` and the training
script's samples."""

from __future__ import annotations

import torch

from .files import save_image


def to_pil_rows(images: torch.Tensor, tile: int) -> list:
    """(N, C, H, W) in [-1, 1], C 1 or 3 -> N PIL RGB images whose longer side is `tile` pixels (small images
    grow by whole pixels, nearest; large ones shrink smoothly)."""
    from PIL import Image

    pix = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pix.shape[1] == 1:
        pix = pix.expand(-1, 3, -1, -1)
    out = []
    for p in pix:
        im = Image.fromarray(p.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
        f = tile / max(im.width, im.height)
        if f != 1:
            im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))),
                           Image.NEAREST if f > 1 else Image.LANCZOS)
        out.append(im)
    return out


def save_labelled_grid(rows: list[tuple[str, torch.Tensor]], path: str, *, columns: list[str] | None = None,
                       tile: int = 96, pad: int = 2, label_width: int | None = None) -> None:
    """One row of images per (label, images) pair, the label written left of it; `columns` names the columns."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    tiles = [to_pil_rows(imgs, tile) for _, imgs in rows]
    w = max(t.width for row in tiles for t in row)
    h = max(t.height for row in tiles for t in row)
    ncol = max(len(r) for r in tiles)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if label_width is None:
        label_width = 8 + max(probe.textlength(label, font=font) for label, _ in rows)
    label_width = int(label_width)
    top = 0
    col_lines = []
    if columns:
        # column names wrap to the tile width
        for name in columns:
            lines, line = [], ""
            for word in name.split():
                trial = f"{line} {word}".strip()
                if probe.textlength(trial, font=font) > w and line:
                    lines.append(line)
                    line = word
                else:
                    line = trial
            col_lines.append(lines + [line])
        top = 12 * max(len(c) for c in col_lines) + 4
    canvas = Image.new("RGB", (label_width + ncol * (w + pad) + pad, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(col_lines):
        for j, line in enumerate(lines):
            draw.text((label_width + pad + c * (w + pad), 2 + 12 * j), line, fill="black", font=font)
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        y = top + pad + r * (h + pad)
        draw.text((4, y + h // 2 - 6), label, fill="black", font=font)
        for c, tile in enumerate(row):
            canvas.paste(tile, (label_width + pad + c * (w + pad), y))
    save_image(canvas, path)
