"""``mil view``: a local web viewer of slides, patch-score heatmaps and mined patches, round by round.

``catalog`` resolves what may be shown, ``tiles`` reads Deep Zoom tiles through OpenSlide (LRU-cached),
``overlays`` draws heatmaps and downloads, ``app`` is the read-only Flask application, ``cli`` serves it.
"""
