"""The naive nuclei baseline: Otsu's threshold of the hematoxylin channel, then a
distance-transform watershed.

It is what a first attempt looks like, kept as the floor every other method is
scored against (``histomarker evaluate nuclei --method otsu``), not for use.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from services.nuclei.segment import hematoxylin_u8

#: Smallest nucleus kept, µm².
MIN_AREA_UM2 = 10.0
#: Least distance between two nucleus centres, µm (the watershed's marker spacing).
MIN_CENTRE_DISTANCE_UM = 3.0


def segment_otsu(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Instance labels: Otsu on the hematoxylin, holes filled, an opening, then a
    watershed of the distance transform from its local maxima."""
    h = cv2.GaussianBlur(hematoxylin_u8(rgb, adaptive=True), (0, 0), sigmaX=1.0)
    _, mask = cv2.threshold(h, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = ndi.binary_fill_holes(mask).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    distance = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    spacing = max(1, round(MIN_CENTRE_DISTANCE_UM / mpp))
    peaks = (distance == ndi.maximum_filter(distance, size=2 * spacing + 1)) & (distance > 1)
    count, markers = cv2.connectedComponents(peaks.astype(np.uint8))
    relief = np.clip(255 - distance * (255.0 / max(float(distance.max()), 1.0)), 0, 255)
    relief = relief.astype(np.uint8)
    labels = cv2.watershed(cv2.merge([relief, relief, relief]), markers.astype(np.int32))
    labels = np.where((labels > 0) & (mask > 0), labels, 0).astype(np.int32)
    areas = np.bincount(labels.ravel(), minlength=count)
    small = areas * mpp * mpp < MIN_AREA_UM2
    small[0] = False
    labels[small[labels]] = 0
    return labels
