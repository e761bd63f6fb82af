"""Just enough SVG for a report's charts: scales with readable ticks, and a figure to draw on.

Hand-built SVG keeps the report one small offline file whose marks are DOM elements: a
browser (and a test) can find every curve, and each mark carries its own tooltip.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: float) -> str:
    """A tick or tooltip number: short, without float noise."""
    if isinstance(value, str):
        return value
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 1e-3:
        return f"{value:.2g}"
    return f"{value:.3g}"


def nice_step(span: float, count: int) -> float:
    raw = span / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


class Scale:
    """Data -> pixels, linear or log10, over [lo, hi] -> [a, b]."""

    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False, integer: bool = False):
        if log:
            lo, hi = max(lo, 1e-300), max(hi, 1e-300)
        if hi == lo:  # one value: give it room so it sits in the middle
            pad = abs(lo) * 0.1 if lo else 1.0
            lo, hi = (lo / 2, hi * 2) if log else (lo - pad, hi + pad)
        self.lo, self.hi, self.a, self.b, self.log, self.integer = lo, hi, a, b, log, integer
        self._f = math.log10 if log else float

    def __call__(self, value: float) -> float:
        t = (self._f(value) - self._f(self.lo)) / (self._f(self.hi) - self._f(self.lo))
        return self.a + t * (self.b - self.a)

    def ticks(self, count: int = 5) -> list[float]:
        if self.log:
            lo, hi = math.floor(math.log10(self.lo)), math.ceil(math.log10(self.hi))
            mults = (1,) if hi - lo > 2 else (1, 2, 5)
            out = [m * 10.0 ** e for e in range(lo, hi + 1) for m in mults]
            return [v for v in out if self.lo * 0.999 <= v <= self.hi * 1.001]
        step = nice_step(self.hi - self.lo, count)
        if self.integer:
            step = max(1, round(step))
        first = math.ceil(self.lo / step - 1e-9) * step
        return [round(first + i * step, 10) for i in range(int((self.hi - first) / step + 1e-9) + 1)]


class Bands:
    """Categories -> evenly spaced pixel positions (a choice parameter's axis)."""

    def __init__(self, values: Sequence, a: float, b: float):
        self.values = list(dict.fromkeys(str(v) for v in values))
        self.a, self.b = a, b

    def __call__(self, value) -> float:
        n = len(self.values)
        if n == 1:
            return (self.a + self.b) / 2
        return self.a + self.values.index(str(value)) * (self.b - self.a) / (n - 1)

    def ticks(self, count: int = 0) -> list:
        return self.values


def padded(lo: float, hi: float, share: float = 0.05, floor: float | None = None,
           ceil: float | None = None) -> tuple[float, float]:
    pad = (hi - lo) * share or 0.02
    lo, hi = lo - pad, hi + pad
    return (lo if floor is None else max(lo, floor)), (hi if ceil is None else min(hi, ceil))


def _attrs(attrs: dict) -> str:
    out = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = key.rstrip("_").replace("_", "-")
        if isinstance(value, float):  # coordinates: 0.01 px is plenty, and keeps the file small
            value = f"{value:.2f}".rstrip("0").rstrip(".")
        out.append(f'{name}="{esc(value)}"')
    return " ".join(out)


class Figure:
    """An SVG canvas with a plot area inside margins (left, top, right, bottom)."""

    def __init__(self, width: int, height: int, margin=(56, 16, 16, 44), label: str = ""):
        self.width, self.height = width, height
        self.left, self.top, self.right, self.bottom = margin
        self.x0, self.x1 = self.left, width - self.right
        self.y0, self.y1 = height - self.bottom, self.top  # y grows upwards in data space
        self.label = label
        self.parts: list[str] = []

    def el(self, tag: str, content: str = "", title: str = "", **attrs) -> None:
        inner = (f"<title>{esc(title)}</title>" if title else "") + content
        self.parts.append(f"<{tag} {_attrs(attrs)}>{inner}</{tag}>" if inner else f"<{tag} {_attrs(attrs)}/>")

    def line(self, x1, y1, x2, y2, **attrs) -> None:
        self.el("line", x1=round(x1, 1), y1=round(y1, 1), x2=round(x2, 1), y2=round(y2, 1), **attrs)

    def polyline(self, points: Sequence[tuple[float, float]], **attrs) -> None:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.el("polyline", points=pts, fill="none", **attrs)

    def text(self, x, y, text, **attrs) -> None:
        self.el("text", esc(text), x=round(x, 1), y=round(y, 1), **attrs)

    def open_group(self, **attrs) -> None:
        self.parts.append(f"<g {_attrs(attrs)}>")

    def close_group(self, title: str = "") -> None:
        self.parts.append((f"<title>{esc(title)}</title>" if title else "") + "</g>")

    def axes(self, xs, ys, xlabel: str = "", ylabel: str = "", xgrid: bool = False, ygrid: bool = True,
             xticks=None, yticks=None) -> None:
        """Frame, grid lines, tick labels and axis titles for scales xs and ys."""
        for v in (yticks if yticks is not None else ys.ticks()):
            y = ys(v)
            if ygrid:
                self.line(self.x0, y, self.x1, y, class_="grid")
            self.text(self.x0 - 6, y + 4, fmt(v), class_="tick", text_anchor="end")
        for v in (xticks if xticks is not None else xs.ticks()):
            x = xs(v)
            if xgrid:
                self.line(x, self.y0, x, self.y1, class_="grid")
            self.line(x, self.y0, x, self.y0 + 4, class_="axis")
            self.text(x, self.y0 + 17, fmt(v), class_="tick", text_anchor="middle")
        self.line(self.x0, self.y0, self.x1, self.y0, class_="axis")
        self.line(self.x0, self.y0, self.x0, self.y1, class_="axis")
        if xlabel:
            self.text((self.x0 + self.x1) / 2, self.height - 6, xlabel, class_="label", text_anchor="middle")
        if ylabel:
            y = (self.y0 + self.y1) / 2
            self.text(14, y, ylabel, class_="label", text_anchor="middle",
                      transform=f"rotate(-90 14 {y:.0f})")

    def render(self, class_: str = "chart", **attrs) -> str:
        head = _attrs({"class": class_, "viewBox": f"0 0 {self.width} {self.height}", "width": self.width,
                       "height": self.height, "role": "img", "aria-label": self.label or None, **attrs})
        return f"<svg {head}>{''.join(self.parts)}</svg>"
