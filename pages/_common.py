"""What the pages share: the signed-in user, the cached sessionmaker, the error edge, labels,
figures and thumbnails.

Not a page (st.navigation lists the pages explicitly, so this file is never shown as one). Figures
are built here from core's records; no metric is computed here, only laid out.
"""

from __future__ import annotations

import contextlib
import html
import re
import runpy
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image as PILImage
from plotly.subplots import make_subplots
from streamlit.runtime.pages_manager import PagesManager

from core import csv_export
from core.access import accounts, remembered
from core.access.accounts import User
from core.access.throttle import SignInThrottle
from core.config import Settings, load_settings
from core.errors import UserError
from core.jobs import queue, views, worker
from pages._sessions import BROWSER_COOKIE

ENTRY_SCRIPT = Path(__file__).resolve().parents[1] / "streamlit_app.py"
IMAGE_TYPES = ["tif", "tiff", "png", "jpg", "jpeg", "bmp"]
# Markdown badges (Material icons ship with Streamlit, so they render without emoji fonts).
STATUS_BADGE = {
    "queued": ":gray-badge[:material/schedule: queued]",
    "running": ":blue-badge[:material/autorenew: running]",
    "succeeded": ":green-badge[:material/check_circle: succeeded]",
    "failed": ":red-badge[:material/error: failed]",
    "cancelled": ":orange-badge[:material/block: cancelled]",
}
# Plotly's default palette, shared so that a class or run keeps its colour across figures.
PALETTE = ["#8e3b7a", "#3b6e8e", "#d08c2e", "#4f9a5b", "#c0392b", "#6c5ce7", "#7f8c8d", "#16a085"]


# --------------------------------------------------------------------------------------------
# Routing


def through_router() -> None:
    """Make sure this page runs inside streamlit_app.py (its page config and sidebar).

    Called first by every page. Because a `pages/` folder sits beside the entry script, Streamlit
    starts in its old multipage mode, which runs pages/NAME.py directly, without the entry script,
    when a fresh server's first request is a page URL (a bookmark of /runs, say). The entry
    script's st.navigation switches that mode off for the process. Until it has run, run the entry
    script here, in this same script run (so a button press that caused it is not lost): it
    routes to this page, which then finds the mode off and draws itself; then stop.
    """
    if PagesManager.uses_pages_directory:
        runpy.run_path(str(ENTRY_SCRIPT), run_name="__main__")
        st.stop()


# --------------------------------------------------------------------------------------------
# Who is signed in (streamlit_app.py lets nobody past its sign-in without a user)

SIGNED_IN = "auth_user"  # session_state key: the user name signed in with a password


@st.cache_resource(show_spinner=False, max_entries=4)
def _accounts_at(path: str, stamp: tuple[int, int], missing_ok: bool) -> accounts.Accounts:
    return accounts.load_accounts(Path(path), missing_ok=missing_ok)


def load_accounts(cfg: Settings, missing_ok: bool = False) -> accounts.Accounts:
    """The accounts file, read again only when it changes (so a removed account or a new role
    takes effect at the user's next click, without restarting the server)."""
    path = cfg.accounts_file
    try:
        info = path.stat()
        stamp = (info.st_mtime_ns, info.st_size)
    except OSError:
        stamp = (0, -1)
    return _accounts_at(str(path), stamp, missing_ok)


def sign_in_throttle() -> SignInThrottle:
    """Failed sign-ins count in the database, across browser sessions and server processes (and
    out of reach of Streamlit's cache clearing, which any client can ask for)."""
    return SignInThrottle(session_factory())


def oidc_roles(cfg: Settings) -> dict[str, str]:
    """Addresses to roles: the accounts file's [oidc_roles], then OIDC_ROLES on top."""
    return {**load_accounts(cfg, missing_ok=True).oidc_roles, **accounts.parse_role_map(cfg.oidc_roles)}


def signed_in_user() -> User | None:
    """The user of this browser session, or None when nobody (with a role) is signed in.

    UserError when the sign-in settings are broken (unknown AUTH_MODE, unreadable accounts file):
    the caller then lets nobody in.
    """
    cfg = settings()
    mode = accounts.check_mode(cfg.auth_mode)
    if mode == "none":
        return accounts.LOCAL_USER
    if mode == "password":
        name = st.session_state.get(SIGNED_IN)
        if name is None:  # a reload or a new tab: this browser may be signed in still
            with session_factory()() as s:
                name = remembered.recall(s, browser_cookie())
        if name is None:
            return None
        account = load_accounts(cfg).accounts.get(name)
        if account is None:  # removed from the file since: signed out
            st.session_state.pop(SIGNED_IN, None)
            return None
        st.session_state[SIGNED_IN] = account.name
        return User(account.name, account.role)
    if not st.user.get("is_logged_in"):
        return None
    return accounts.oidc_user(oidc_roles(cfg), st.user.get("email"), st.user.get("email_verified"))


def current_user() -> User:
    """The signed-in user. A page run without one (which the entry script's gate prevents) stops
    here, drawing nothing."""
    try:
        user = signed_in_user()
    except UserError:
        user = None
    if user is None:
        st.stop()
    return user


def require_editor(action: str) -> None:
    """UserError unless the signed-in user is an editor: checked again where an action is carried
    out, so a crafted request cannot reach a control the page did not draw."""
    accounts.require_editor(current_user(), action)


def browser_cookie() -> str | None:
    """This browser's HttpOnly cookie, set by serve.py (None when the app is served without it)."""
    cookie = st.context.cookies.get(BROWSER_COOKIE)
    return cookie if isinstance(cookie, str) else None  # the test harness has no request behind it


def sign_out() -> None:
    if settings().auth_mode == "oidc":
        st.logout()
    else:
        with session_factory().begin() as s:  # every tab of this browser, not only this one
            remembered.forget(s, browser_cookie())
        # Everything the session remembers goes, so the next person at this browser starts clean.
        for key in list(st.session_state):
            del st.session_state[key]
        st.rerun()


# --------------------------------------------------------------------------------------------
# Settings, database, worker


def settings() -> Settings:
    return load_settings()


@st.cache_resource(show_spinner=False)
def _sessionmaker(url: str):
    return views.sessions(url)


def session_factory():
    """The one sessionmaker of this server process (per database URL)."""
    return _sessionmaker(settings().database_url)


def start_worker(cfg: Settings) -> bool:
    """Make sure a background worker is alive to take queued runs (starts one if none is)."""
    return worker.ensure_worker(cfg)


def request_cancel(Session, run_id: int) -> None:
    require_editor("cancel runs")
    with Session.begin() as s:
        queue.request_cancel(s, run_id)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """The page edge: a mistake the user can fix is shown as st.error, never as a traceback. The
    message is plain text and often quotes a name (a file, a dataset), so it is shown as text; in the
    pages' words where the error has them (it names the page's options rather than the CLI's flags)."""
    try:
        yield
    except UserError as e:
        st.error(md_text(e.for_page()), icon=":material/warning:")


# --------------------------------------------------------------------------------------------
# Names from outside, shown as text

# What Markdown reads as markup inside a line (CommonMark, GFM, Streamlit's `:color[...]`
# directives, LaTeX; "&" starts an entity), and a list marker at the start.
_MARKUP = re.compile(r"([\\`*_\[\]()#!|~<>:$&])")
_LIST_MARKER = re.compile(r"^(\d*)([-+.])")
# Streamlit's renderer rewrites some text after the escapes are resolved: bare addresses (`http://`,
# `www.`, `a@b.c`) into links, `:streamlit:`, `:material/...:` and `:smile:` into pictures, `->` and
# `>=` into arrows. An invisible word joiner (U+2060) inside each keeps the text as it reads.
_REWRITTEN = re.compile(r"(?<=:)|(?=@)|(?<=www)(?=\.)|(?<=[-<>~])(?=[-<>=])", re.IGNORECASE)


def md_text(name: object) -> str:
    """`name` as Markdown that shows it literally, for every element that renders Markdown
    (st.markdown, caption, error/warning/info/success, widget, metric and expander labels, metric
    values, image captions, radio options). Names come from outside (file, class, dataset, group,
    preset and user names, messages quoting them): unescaped, one could draw links, images or
    Streamlit's directives on a viewer's page. Runs of white space become one space, as a browser
    shows them. Select boxes and multiselects draw their options as plain text: give them the name."""
    text = _REWRITTEN.sub("\u2060", " ".join(str(name).split()))
    text = _MARKUP.sub(r"\\\1", text)
    return _LIST_MARKER.sub(r"\1\\\2", text)


def text_table(data, *, hide_index: bool = True, **kwargs) -> None:
    """A small table whose cells hold text from outside (run names and notes, approvers, settings
    such as the device), read whole. st.dataframe draws every cell as text; st.table renders Markdown
    in each cell, header and index, so a note holding an image link would load it in every viewer's
    browser: pages use this, never st.table. Rows tall enough for the grid to wrap long text (it
    wraps above 64 px)."""
    st.dataframe(
        data, hide_index=hide_index, row_height=72, height=min(520, 38 + 73 * len(data)), placeholder="–", **kwargs
    )


def csv_bytes(frame) -> bytes:
    """A table (a pandas DataFrame, its columns as the header) as a CSV download, written by core's
    one CSV writer (core/csv_export.py), which keeps a spreadsheet from running names as formulas.
    Missing values are empty cells, as pandas writes them."""
    cells = frame.astype(object).where(frame.notna(), None)
    return csv_export.csv_text(list(frame.columns), cells.itertuples(index=False, name=None)).encode()


def plot_text(name: object) -> str:
    """`name` for a plotly title, axis category or trace name: plotly reads a subset of HTML there
    (`<a href>`, `<b>`, `<br>`) and shows entities as their characters, so escaping keeps it text."""
    return html.escape(str(name), quote=False)


# --------------------------------------------------------------------------------------------
# Labels


def pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def verdict_words(refer: bool | None) -> str:
    """A prediction's verdict in the pages' words; None: the model has no refer band (not calibrated)."""
    return "no refer band" if refer is None else "uncertain, refer" if refer else "confident"


# --------------------------------------------------------------------------------------------
# Figures


def _layout(fig: go.Figure, title: str, subtitle: str = "", height: int = 380, wrap: int = 110) -> go.Figure:
    """Title, and the subtitle (the protocol) wrapped to lines of about `wrap` characters:
    plotly does not wrap titles itself. Both are text (a title may name a dataset)."""
    lines = textwrap.wrap(subtitle, wrap) if subtitle else []
    text = "<br>".join([plot_text(title), *(f"<sup>{plot_text(line)}</sup>" for line in lines)])
    height += 14 * max(0, len(lines) - 1)
    fig.update_layout(
        title={"text": text, "x": 0, "xanchor": "left"},
        height=height,
        margin={"l": 10, "r": 10, "t": 60 + 14 * len(lines), "b": 10},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


def class_counts_figure(counts: dict[str, int], title: str, subtitle: str = "") -> go.Figure:
    names = [plot_text(n) for n in counts]
    fig = go.Figure(
        go.Bar(
            x=names,
            y=list(counts.values()),
            text=list(counts.values()),
            textposition="outside",
            marker_color=[PALETTE[i % len(PALETTE)] for i in range(len(names))],
        )
    )
    fig.update_yaxes(title="images", rangemode="tozero")
    fig.update_xaxes(title="class")
    return _layout(fig, title, subtitle, height=340)


def curves_figure(series: Sequence[tuple[str, Sequence]], title: str, subtitle: str = "") -> go.Figure:
    """Loss and accuracy per epoch; `series` is (name, epoch rows) per run. One run: train and
    validation curves; several: validation curves (train where there is no validation) overlaid."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"), horizontal_spacing=0.08)
    single = len(series) == 1
    for i, (name, epochs) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        x = [e.epoch for e in epochs]
        has_val = any(e.val_loss is not None for e in epochs)
        lines = []
        if single or not has_val:
            lines.append(("train", "train_loss", "train_accuracy", "dot" if has_val else "solid"))
        if has_val:
            lines.append(("validation", "val_loss", "val_accuracy", "solid"))
        for part, loss_key, acc_key, dash in lines:
            label = part if single else f"{name} ({part})"
            for col, key in ((1, loss_key), (2, acc_key)):
                fig.add_trace(
                    go.Scatter(
                        x=x,
                        y=[getattr(e, key) for e in epochs],
                        mode="lines+markers",
                        name=label,
                        legendgroup=label,
                        showlegend=col == 1,
                        line={
                            "color": colour if not single else (PALETTE[0] if part == "train" else PALETTE[1]),
                            "dash": dash,
                        },
                    ),
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title="epoch", dtick=1 if max((len(e) for _, e in series), default=0) <= 30 else None)
    fig.update_yaxes(title="cross-entropy", row=1, col=1, rangemode="tozero")
    fig.update_yaxes(title="accuracy", row=1, col=2, range=[0, 1.02], tickformat=".0%")
    return _layout(fig, title, subtitle, height=400)


def confusion_figure(
    confusion: np.ndarray, classes: Sequence[str], title: str, subtitle: str = "", wrap: int = 110
) -> go.Figure:
    z = np.asarray(confusion)
    row_sums = z.sum(1, keepdims=True)
    share = np.divide(z, row_sums, out=np.zeros(z.shape, dtype=float), where=row_sums > 0)
    text = [[f"{z[i, j]}<br>{share[i, j]:.0%}" for j in range(z.shape[1])] for i in range(z.shape[0])]
    names = [plot_text(c) for c in classes]
    fig = go.Figure(
        go.Heatmap(
            z=share,
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            colorscale=[[0, "#ffffff"], [1, PALETTE[0]]],
            zmin=0,
            zmax=1,
            colorbar={"title": "share of<br>true class", "tickformat": ".0%"},
            hovertemplate="true %{y}, predicted %{x}: %{text}<extra></extra>",
        )
    )
    fig.update_xaxes(title="predicted class", side="bottom")
    fig.update_yaxes(title="true class", autorange="reversed")
    return _layout(fig, title, subtitle, height=420, wrap=wrap)


def reliability_chart(before, after, title: str, subtitle: str = "", wrap: int = 110) -> go.Figure:
    """core's reliability diagram (bins as trained and temperature-scaled), titled like the others."""
    from core.evaluation.calibration import reliability_figure

    fig = reliability_figure(before, title, other=after, names=("as trained", "temperature-scaled"))
    return _layout(fig, title, subtitle, height=420, wrap=wrap)


def probabilities_figure(
    classes: Sequence[str], probabilities: Sequence[float], title: str, subtitle: str = "", wrap: int = 110
) -> go.Figure:
    best = int(np.argmax(probabilities))
    fig = go.Figure(
        go.Bar(
            x=[float(p) for p in probabilities],
            y=[plot_text(c) for c in classes],
            orientation="h",
            text=[f"{p:.1%}" for p in probabilities],
            textposition="auto",
            marker_color=[PALETTE[0] if i == best else "#c9b3c4" for i in range(len(classes))],
        )
    )
    fig.update_xaxes(range=[0, 1.001], tickvals=[0, 0.25, 0.5, 0.75, 1], tickformat=".0%", title="probability")
    fig.update_yaxes(autorange="reversed")
    fig = _layout(fig, title, subtitle, height=90 + 45 * len(classes), wrap=wrap)
    fig.update_layout(margin_r=28)  # room for the "100%" tick label
    return fig


# Transparent where a region did not raise the score, so the tissue stays visible under the map.
HEAT_SCALE = [
    [0.0, "rgba(255,255,178,0)"],
    [0.35, "rgba(254,204,92,0.55)"],
    [0.7, "rgba(240,59,32,0.85)"],
    [1.0, "rgba(189,0,38,1)"],
]


def saliency_figure(
    image: PILImage.Image,
    cells: np.ndarray,
    title: str,
    subtitle: str = "",
    scale_title: str = "how much this region raised the class score",
    wrap: int = 42,
) -> go.Figure:
    """The image with a heat layer of `cells` ((h, w) in [0, 1], one value per cell of the map, laid
    evenly over the image) at opacity 0.45 on top, and a colour scale saying what the colours mean."""
    import base64
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=85)
    source = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    width, height = image.size
    rows, cols = cells.shape
    fig = go.Figure(go.Image(source=source, x0=0, dx=1, y0=0, dy=1, hoverinfo="skip"))
    fig.add_trace(
        go.Heatmap(
            z=np.asarray(cells, dtype=float).round(3),
            x0=width / cols / 2,
            dx=width / cols,
            y0=height / rows / 2,
            dy=height / rows,
            zmin=0,
            zmax=1,
            opacity=0.45,
            colorscale=HEAT_SCALE,
            zsmooth="best",
            colorbar={
                "title": {
                    "text": "<br>".join(plot_text(line) for line in textwrap.wrap(scale_title, 18)),
                    "side": "right",
                },
                "tickvals": [0, 0.5, 1],
                "ticktext": ["not at all", "some", "most"],
                "thickness": 12,
            },
            hovertemplate="%{z:.0%} of the most<extra></extra>",
        )
    )
    fig.update_xaxes(visible=False, range=[0, width], constrain="domain")
    fig.update_yaxes(visible=False, range=[height, 0], scaleanchor="x", constrain="domain")
    fig = _layout(fig, title, subtitle, height=int(80 + 330 * min(1.5, height / max(1, width))), wrap=wrap)
    fig.update_layout(margin_r=10, margin_b=5)
    return fig


@st.cache_resource(show_spinner=False, max_entries=4)
def grad_cam_for(run_id: int, model: str | None, database_url: str):
    """The run's Grad-CAM explainer (torch, loaded on first use), kept per model file and server."""
    from core.inference import engine, saliency

    with session_factory()() as s:
        return saliency.GradCam(engine.get_predictor(s, settings(), run_id))


def show_grad_cam(cam, image_size: int, class_name: str, run_id: int, key: str) -> None:
    """A Grad-CAM map over the whole image, with a caption that says what is drawn and a note when
    the map is too coarse or flat to point at anything."""
    (rows, cols), name = cam.grid, md_text(class_name)
    about = (
        f"Gradient-weighted class activation map (Grad-CAM) on {cam.layer} of DenseNet-201: {rows}×{cols} "
        f"cells for this run's {image_size} px inputs. The deepest block with at least 7×7 cells at the run's "
        "image size is used (the finest one where none has); earlier blocks are finer but less specific to the "
        "class. Colours are relative to the image's strongest region."
    )
    if cam.flat:
        st.info(
            f"Grad-CAM for {name}: no heat map to show. No region of this image raised the class's score at "
            f"{cam.layer}, so the map is the same everywhere.",
            icon=":material/blur_off:",
        )
        return
    show_figure(
        saliency_figure(
            cam.image, cam.cells, f"Grad-CAM for {class_name}", f"run {run_id} · {cam.layer} · {rows}×{cols} cells"
        ),
        key=key,
    )
    st.caption(
        f"Grad-CAM for {name} on {cam.layer}, over the whole image at its own proportions: the warmer the "
        f"colour, the more that region raised the score of {name}. The map has {rows}×{cols} cells, shaded "
        f"smoothly between their centres, so it points at regions about 1/{cols} of the image wide, not at "
        "single cells.",
        help=about,
    )
    if cam.coarse:
        st.info(
            f"Grad-CAM for {name}: the map is only {rows}×{cols} cells at {image_size} px; it cannot point at "
            "cells or structures, only at a part of the image. A run trained at 224 px (the paper's size) gives "
            "7×7 cells or more.",
            icon=":material/grid_on:",
        )


def show_figure(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, key=key, config={"displaylogo": False})


# --------------------------------------------------------------------------------------------
# Images


@st.cache_data(show_spinner=False, max_entries=1000)
def thumbnail(path: str, side: int = 192) -> np.ndarray:
    """A small RGB copy of a stored image (aspect ratio kept), cached by path: stored files are
    named by their content hash, so a path never changes what it holds."""
    from core.data.decoding import load_rgb

    image = load_rgb(path)
    image.thumbnail((side, side), PILImage.BILINEAR)
    return np.asarray(image)


def page_header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)
