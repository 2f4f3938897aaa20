import os

# A hub lookup stalls 20+ s before failing on a machine without network; tests never download.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
