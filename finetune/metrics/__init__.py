"""Task metrics that must match their official scripts: VQA accuracy (``vqa``), COCO caption metrics (``caption``)."""
