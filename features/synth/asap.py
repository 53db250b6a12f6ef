"""ASAP XML annotations (the Camelyon16 layout), written from shapely polygons in level-0 pixels."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon

from features.store import atomic_path

GROUP_COLORS = {"Tumor": "#F4FA58", "Lookalike": "#64FE2E", "Exclusion": "#FF0000"}


def asap_xml(groups: Mapping[str, Sequence[Polygon]]) -> bytes:
    """The XML document: one ``Annotation`` per polygon exterior, one ``Group`` per group name (even if empty)."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    index = 0
    for group, polygons in groups.items():
        for polygon in polygons:
            node = ET.SubElement(annotations, "Annotation", Name=f"Annotation {index}", Type="Polygon",
                                 PartOfGroup=group, Color=GROUP_COLORS.get(group, "#0000FF"))
            coordinates = ET.SubElement(node, "Coordinates")
            for order, (x, y) in enumerate(np.asarray(polygon.exterior.coords)[:-1]):
                ET.SubElement(coordinates, "Coordinate", Order=str(order), X=f"{x:.2f}", Y=f"{y:.2f}")
            index += 1
    group_nodes = ET.SubElement(root, "AnnotationGroups")
    for group in groups:
        node = ET.SubElement(group_nodes, "Group", Name=group, PartOfGroup="None",
                             Color=GROUP_COLORS.get(group, "#0000FF"))
        ET.SubElement(node, "Attributes")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_asap(path: str | Path, groups: Mapping[str, Sequence[Polygon]]) -> Path:
    """Write :func:`asap_xml` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(asap_xml(groups))
    return path
