"""Whole-slide images: a slide opened through OpenSlide at a known microns per pixel (reader.py), its
tissue found on the thumbnail and each tile checked (tissue.py), and a grid of tiles at a chosen
microns per pixel over that tissue, read back in bounded batches (tiling.py).

Tiles are cut by physical scale (microns per pixel), not by pyramid level, as CLAM, Slideflow,
TIAToolbox and WSInfer do, so slides from scanners with different objectives give tiles of the same
scale. reader, tissue and tiling import only core.errors; predict.py (a slide classified at its model's
scale) and outputs.py (its CSV, GeoJSON and heat map) build on them with the project's predictor;
slide datasets are core/data/slide_ingest.py's.
"""
