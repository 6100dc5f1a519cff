"""The Streamlit demo: query an index with any submodel or a latency budget, and compare S with XL.

    matvit demo --index IDX --checkpoint DIR [--results docs/results]
    streamlit run app/demo.py -- --index IDX --checkpoint DIR

IDX is an index directory or `milvus:URI` (see `retrieval.store`). Result pictures come from the index (dataset
pixels, stored uploads, files under an indexed folder), never from an item's name; uploads and pictures are
decoded with the API's limits and conversions (`matvit.images`).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from pathlib import Path

import numpy as np
import streamlit as st

from matvit import data
from matvit.errors import UserError
from matvit.images import MAX_DECODE_BYTES, MAX_PIXELS, to_hwc
from retrieval.budget import Budget
from retrieval.retriever import Retriever

log = logging.getLogger(__name__)

TILE, QUERY = 96, 128  # displayed widths of a result and of the query, in pixels
DECODE_SLOTS = 4  # images decoding at once, as the API's default
MAX_ITEM_IMAGE_BYTES = 32 * 2**20  # the largest gallery image file read for a tile, as the API's default


def parse_args() -> argparse.Namespace:
    """Options after `--` on the streamlit command line, else MATVIT_INDEX / MATVIT_CHECKPOINT / MATVIT_RESULTS."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default=os.environ.get("MATVIT_INDEX"))
    parser.add_argument("--checkpoint", type=Path, default=os.environ.get("MATVIT_CHECKPOINT"))
    parser.add_argument("--results", type=Path, default=os.environ.get("MATVIT_RESULTS", "docs/results"))
    return parser.parse_known_args()[0]


@st.cache_resource
def load_retriever(index: str, checkpoint: str) -> Retriever:
    """The retriever, with the API's image limits and a latency profile of this model on this machine (measured
    once if none is stored)."""
    retriever = Retriever(index, Path(checkpoint), max_pixels=MAX_PIXELS, max_decode_bytes=MAX_DECODE_BYTES,
                          decode_slots=DECODE_SLOTS)
    retriever.ensure_profile()
    return retriever


@st.cache_resource
def load_queries(dataset: str, img_size: int, in_chans: int) -> data.ImageSet | None:
    try:
        return data.load(dataset, "test", img_size, in_chans)
    except UserError:
        return None


def tile_image(retriever: Retriever, item_id: int) -> np.ndarray | None:
    """A gallery item's picture for a result tile, from what the index holds (its dataset pixels, its stored
    upload, or its file under the indexed folder; never a path taken from its name), decoded within the image
    limits; None when it has none to show."""
    return _tile_image(retriever, retriever.store.name, retriever.index.version, item_id)


@st.cache_data(max_entries=1024, show_spinner=False)
def _tile_image(_retriever: Retriever, index: str, version: str, item_id: int) -> np.ndarray | None:
    """`tile_image`, cached per index, version and item."""
    try:
        content, _ = _retriever.item_image(item_id, MAX_ITEM_IMAGE_BYTES)
        return _retriever.preview(content, 2 * TILE)
    except UserError as e:
        log.info("no picture for item %d: %s", item_id, e)
        return None


def show_results(retriever: Retriever, result, true_label: str | None, columns: int = 5) -> None:
    c = result.submodel
    st.caption(f"**{c.spec}** · {c.gflops:.4f} GFLOPs · {c.params:,} parameters · "
               f"encode {result.timings_ms['encode']:.1f} ms · {c.reason} · searched {result.search.text}")
    cols = st.columns(columns)
    for i, hit in enumerate(result.neighbours):
        mark = "" if true_label is None else (" ✅" if hit["label"] == true_label else " ❌")
        with cols[i % columns]:
            picture = tile_image(retriever, hit["id"])
            if picture is None:
                st.caption("(no image to show)")
            else:
                st.image(picture, width=TILE)
            st.markdown(f"#{hit['rank']} `{hit['label']}`{mark}  \n{hit['score']:.3f}")


def main() -> None:
    args = parse_args()
    st.set_page_config(page_title="matvit demo", layout="wide")
    st.title("matvit: one XL index, any query encoder")
    if args.index is None or args.checkpoint is None:
        st.error("start the demo with --index IDX --checkpoint DIR")
        return
    try:
        retriever = load_retriever(str(args.index), str(args.checkpoint))
    except UserError as e:
        st.error(str(e))
        return
    encoder = retriever.encoder
    manifest = retriever.index.manifest
    st.write(f"Index: {manifest['count']:,} items embedded by **{manifest['submodel']}** ({manifest['source']}).")

    with st.sidebar:
        st.header("Query")
        upload = st.file_uploader("Upload an image", type=["png", "jpg", "jpeg", "webp", "bmp", "gif"])
        queries = load_queries(encoder.meta.get("dataset", ""), encoder.image_size, encoder.channels)
        if queries is not None and st.button("Random test image"):
            st.session_state["pick"] = random.randrange(len(queries))
        st.header("Submodel")
        mode = st.radio("Choose by", ["granularity", "Mix'n'Match spec", "latency budget"])
        submodel, budget = None, None
        if mode == "granularity":
            submodel = st.select_slider("Granularity", [s.text for s in encoder.named()], value="S")
        elif mode == "Mix'n'Match spec":
            half = encoder.depth // 2
            submodel = st.text_input("Spec (one granularity per layer)",
                                     ",".join(["S"] * half + ["XL"] * (encoder.depth - half)))
        else:
            rows = retriever.profile_rows()
            lo, hi = min(r["latency_ms_b1"] for r in rows), max(r["latency_ms_b1"] for r in rows)
            budget = Budget(ms=st.slider("Latency budget (ms, batch 1)", float(lo), float(hi * 1.5), float(hi)))
        k = st.slider("k", 1, 20, 10)
        plan = None
        if len(encoder.model.dims) > 1:  # a Matryoshka model: its prefixes may be searched
            st.header("Search dimensions")
            dims = st.select_slider("Dimensions", encoder.model.dims, value=encoder.dim)
            funnel = st.checkbox("Funnel: re-rank the prefix's shortlist by the full vectors")
            full = dims == encoder.dim and not funnel  # the full vectors, or what a budget chooses
            plan = None if full else retriever.search_plan(None if funnel else dims, dims if funnel else None, k)

    query, shown, true_label = None, None, None
    try:
        if upload is not None:
            query, _ = retriever.decode([upload.getvalue()])
            shown = retriever.preview(upload.getvalue(), 2 * QUERY)
        elif queries is not None and "pick" in st.session_state:
            i = st.session_state["pick"]
            query, shown = queries.images[i:i + 1], to_hwc(queries.images[i])
            true_label = queries.classes[int(queries.labels[i])]
        if query is not None:
            chosen = retriever.search(query, k=k, submodel=submodel, budget=budget, plan=plan)[0]
            small = retriever.search(query, k=k, submodel="S")[0]
            large = retriever.search(query, k=k, submodel="XL")[0]
    except UserError as e:
        st.error(str(e))
        return
    if query is None:
        st.info("Upload an image or draw a random test image to search.")
    else:
        left, right = st.columns([1, 4])
        with left:
            st.image(shown, caption=f"query{'' if true_label is None else f' ({true_label})'}", width=QUERY)
        with right:
            st.subheader("Results")
            show_results(retriever, chosen, true_label)
        st.subheader("S and XL side by side, same query, same XL index")
        a, b = st.columns(2)
        with a:
            show_results(retriever, small, true_label, columns=5)
        with b:
            show_results(retriever, large, true_label, columns=5)

    pictures = sorted(args.results.glob("**/*.png")) if args.results.is_dir() else []
    if pictures:
        st.header("Benchmark results")
        for path in pictures:
            st.image(str(path), caption=str(path.relative_to(args.results)))


if __name__ == "__main__":
    main()
