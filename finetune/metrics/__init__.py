"""Task metrics that must match their official scripts: VQA accuracy (``vqa``) and COCO caption metrics (``caption``)."""
