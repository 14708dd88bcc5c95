"""Synthetic Taskonomy views in the exact raw encodings (see TASKONOMY.md), for tests and smoke runs.

Real Taskonomy may not be redistributed, so the pipeline is tested on rooms rendered here: a box-shaped room
(floor, ceiling, four walls, sometimes a window with nothing behind it = depth holes) holding a few rotated
boxes, ray cast per pixel with numpy. Every label is derived from the same geometry, so each task is
learnable from rgb (shading follows the normals, box colours follow the class, edges follow the texture):

- ``rgb``: uint8 HxWx3, class/surface colour x procedural texture x Lambert shading, sky in the window.
- ``depth_zbuffer``: uint16, z-buffer depth (along the optical axis) in 1/512 m; 65535 = no geometry.
- ``normal``: uint8 HxWx3, camera frame (x right, y up, z towards the camera) as round((n + 1) * 127.5);
  exactly (128, 128, 128) on the depth holes and nowhere else (a unit vector never encodes to it).
- ``edge_texture``: uint16, smoothed Sobel magnitude of the rgb luminance (Canny without NMS), img_as_uint
  scaled; max a few thousand like the real data.
- ``keypoints2d``: uint16, Gaussian blobs (peak ~1000) at visible box and room corners.
- ``segment_semantic``: uint8, 0 = uncertain (depth holes and a 1-pixel rim inside each box silhouette),
  1 = background (room surfaces), 2..17 = box class in the Taskonomy/COCO order of :data:`CLASSES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from l2b_fast.data.labels import LABELS_MEMBER, check_label_fraction, count_labels, sample_labels
from l2b_fast.data.shards import encode_png, prepare_output_dir, split_counts, write_manifest, write_split
from l2b_fast.datasets.taskonomy.protocol import TASKS

__all__ = ["CLASSES", "DOMAINS", "Room", "random_room", "random_camera", "render", "make_scene", "generate"]

CLASSES = (
    "bottle",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
)  # labels 2..17
DOMAINS = ("rgb", "depth_zbuffer", "normal", "edge_texture", "keypoints2d", "segment_semantic")
DEPTH_UNITS_PER_M = 512.0
NO_GEOMETRY = 65535

# one distinct colour per class (hues spread around the wheel, alternating brightness) so classes are separable
_CLASS_COLOURS = np.array(
    [
        [0.85, 0.20, 0.20],
        [0.20, 0.65, 0.25],
        [0.25, 0.35, 0.85],
        [0.90, 0.75, 0.15],
        [0.65, 0.25, 0.75],
        [0.15, 0.75, 0.75],
        [0.95, 0.50, 0.10],
        [0.45, 0.45, 0.45],
        [0.55, 0.85, 0.35],
        [0.45, 0.20, 0.10],
        [0.95, 0.55, 0.70],
        [0.10, 0.30, 0.35],
        [0.90, 0.90, 0.85],
        [0.35, 0.15, 0.55],
        [0.70, 0.60, 0.40],
        [0.10, 0.10, 0.20],
    ]
)


@dataclass
class Box:
    center: np.ndarray  # world (x, y, z), y up, floor at y = 0
    half: np.ndarray  # half extents in the box frame
    yaw: float
    label: int  # 2..17
    colour: np.ndarray
    period: float  # texture checker period (m)


@dataclass
class Room:
    lower: np.ndarray  # (x0, 0, z0)
    upper: np.ndarray  # (x1, H, z1); the back wall is z = z1
    window: tuple | None  # (xa, xb, ya, yb) on the back wall, nothing behind it
    boxes: list = field(default_factory=list)
    floor_colour: np.ndarray = None
    wall_colour: np.ndarray = None
    ceiling_colour: np.ndarray = None
    light: np.ndarray = None  # unit vector towards the light (world)
    plank: float = 0.2
    stripe: float = 0.3


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def random_room(rng: np.random.Generator) -> Room:
    """A room (3-7 m wide, 4-9 m deep, 2.4-3.2 m high) with 2-6 boxes on the floor, away from the camera area."""
    width, depth, height = rng.uniform(3.0, 7.0), rng.uniform(4.0, 9.0), rng.uniform(2.4, 3.2)
    x0 = -rng.uniform(0.35, 0.65) * width
    lower, upper = np.array([x0, 0.0, 0.0]), np.array([x0 + width, height, depth])
    window = None
    if rng.random() < 0.8:
        wa = rng.uniform(0.25, 0.6) * width
        xa = rng.uniform(lower[0] + 0.2, upper[0] - 0.2 - wa)
        ya = rng.uniform(0.6, 1.2)
        window = (xa, xa + wa, ya, min(height - 0.2, ya + rng.uniform(0.8, 1.4)))
    boxes = []
    for _ in range(int(rng.integers(2, 7))):
        half = np.array([rng.uniform(0.15, 0.6), rng.uniform(0.15, 0.75), rng.uniform(0.15, 0.6)])
        cx = rng.uniform(lower[0] + 0.3, upper[0] - 0.3)
        cz = rng.uniform(2.2, max(2.3, depth - 0.4))
        label = int(rng.integers(2, 18))
        colour = np.clip(_CLASS_COLOURS[label - 2] * rng.uniform(0.9, 1.1, 3), 0.0, 1.0)
        boxes.append(
            Box(
                np.array([cx, half[1], cz]),
                half,
                rng.uniform(-math.pi, math.pi),
                label,
                colour,
                rng.uniform(0.08, 0.25),
            )
        )
    light = np.array([rng.uniform(-0.5, 0.5), 1.0, rng.uniform(-0.8, -0.2)])
    return Room(
        lower,
        upper,
        window,
        boxes,
        floor_colour=rng.uniform([0.35, 0.25, 0.15], [0.65, 0.5, 0.35]),
        wall_colour=rng.uniform(0.55, 0.9, 3),
        ceiling_colour=np.full(3, rng.uniform(0.85, 0.95)),
        light=light / np.linalg.norm(light),
        plank=rng.uniform(0.12, 0.3),
        stripe=rng.uniform(0.2, 0.5),
    )


def random_camera(
    rng: np.random.Generator, room: Room, position: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(position, camera-to-world rotation): standing in the front metre of the room, eyes 1.2-1.7 m high,
    yaw +-25 degrees, looking 20 degrees down to 5 degrees up. Pass ``position`` to keep a point's position."""
    if position is None:
        position = np.array(
            [rng.uniform(room.lower[0] + 0.5, room.upper[0] - 0.5), rng.uniform(1.2, 1.7), rng.uniform(0.3, 1.0)]
        )
    rotation = _rot_y(math.radians(rng.uniform(-25, 25))) @ _rot_x(math.radians(rng.uniform(-5, 20)))
    return np.asarray(position, dtype=np.float64), rotation


def _blur3(a: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 blur along both axes (edge padding)."""
    p = np.pad(a, 1, mode="edge")
    a = (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4
    return (a[:-2] + 2 * a[1:-1] + a[2:]) / 4


def render(
    room: Room,
    position: np.ndarray,
    rotation: np.ndarray,
    size: int,
    rng: np.random.Generator,
    fov_degrees: float = 75.0,
) -> dict[str, np.ndarray]:
    """Ray cast ``room`` from the camera (``rotation`` maps camera x right / y up / z forward to world) into the
    six raw modalities at ``size`` x ``size``; ``rng`` only adds the rgb sensor noise."""
    n = size * size
    focal = size / 2 / math.tan(math.radians(fov_degrees) / 2)
    coords = (np.arange(size) + 0.5 - size / 2) / focal
    cam_dirs = np.empty((3, size, size))  # component-major: row slices are contiguous and fast
    cam_dirs[0] = coords[None, :]
    cam_dirs[1] = -coords[:, None]
    cam_dirs[2] = 1.0  # so the ray parameter t is the z-buffer depth
    dirs = rotation @ cam_dirs.reshape(3, n)
    dirs[np.abs(dirs) < 1e-12] = 1e-12

    # room: the camera is inside a convex box, so the first hit is the nearest plane ahead along each axis
    t = np.full(n, np.inf)
    axis = np.zeros(n, dtype=np.int64)
    for k in range(3):
        t_k = np.where(dirs[k] > 0, room.upper[k] - position[k], room.lower[k] - position[k]) / dirs[k]
        nearer = t_k < t
        axis[nearer], t = k, np.minimum(t, t_k)
    normal = np.zeros((3, n))
    for k in range(3):
        normal[k] = np.where(axis == k, -np.sign(dirs[k]), 0.0)  # inward normal of the plane that was hit
    point = position[:, None] + t * dirs
    # texture and colour per room surface
    floor, ceiling = (axis == 1) & (dirs[1] < 0), (axis == 1) & (dirs[1] > 0)
    back = (axis == 2) & (dirs[2] > 0)
    walls = ~(floor | ceiling)
    colour = np.where(
        floor, room.floor_colour[:, None], np.where(ceiling, room.ceiling_colour[:, None], room.wall_colour[:, None])
    )
    tex = np.ones(n)
    tex[floor] = 0.82 + 0.18 * (np.floor(point[0, floor] / room.plank) % 2)
    wall_coord = np.where(back, point[0], point[2])
    tex[walls] = 0.9 + 0.1 * (np.floor(wall_coord[walls] / room.stripe) % 2)
    if room.window is not None:
        xa, xb, ya, yb = room.window
        hole = back & (point[0] > xa) & (point[0] < xb) & (point[1] > ya) & (point[1] < yb)
        t[hole] = np.inf
    label = np.where(np.isfinite(t), 1, 0).astype(np.uint8)

    for box in room.boxes:
        rb = _rot_y(box.yaw)
        origin = rb.T @ (position - box.center)
        local = rb.T @ dirs
        local[np.abs(local) < 1e-12] = 1e-12
        t_near, t_far = np.full(n, -np.inf), np.full(n, np.inf)
        ax = np.zeros(n, dtype=np.int64)
        for k in range(3):  # slab test
            a, b = (-box.half[k] - origin[k]) / local[k], (box.half[k] - origin[k]) / local[k]
            lo = np.minimum(a, b)
            ax[lo > t_near] = k
            t_near, t_far = np.maximum(t_near, lo), np.minimum(t_far, np.maximum(a, b))
        closer = (t_near <= t_far) & (t_near > 1e-6) & (t_near < t)
        if not closer.any():
            continue
        idx = np.nonzero(closer)[0]
        tn, axi, loc = t_near[idx], ax[idx], local[:, idx]
        local_normal = np.zeros((3, idx.size))
        for k in range(3):
            local_normal[k] = np.where(axi == k, -np.sign(loc[k]), 0.0)
        t[idx] = tn
        normal[:, idx] = rb @ local_normal
        label[idx] = box.label
        colour[:, idx] = box.colour[:, None]
        hit = origin[:, None] + tn * loc
        tex[idx] = 0.78 + 0.22 * (np.floor(hit / box.period).sum(0) % 2)

    normal, colour = normal.T, colour.T
    valid = np.isfinite(t)
    shade = 0.45 + 0.55 * np.clip(normal @ room.light, 0.0, 1.0)
    rgb = np.clip(colour * (tex * shade)[:, None], 0.0, 1.0)
    sky_v = np.repeat(np.linspace(0.0, 1.0, size), size)
    sky = np.stack([0.55 + 0.3 * sky_v, 0.75 + 0.2 * sky_v, np.full(n, 1.0)], 1)
    rgb = np.where(valid[:, None], rgb, sky).reshape(size, size, 3)

    # depth (z-buffer) and normals in the camera frame (z towards the camera)
    depth = np.full(n, NO_GEOMETRY, dtype=np.uint16)
    depth[valid] = np.clip(np.round(t[valid] * DEPTH_UNITS_PER_M), 0, NO_GEOMETRY - 1).astype(np.uint16)
    cam_normal = normal @ rotation  # rows: rotation.T @ n
    cam_normal[:, 2] *= -1
    normal_png = np.clip(np.round((cam_normal + 1.0) * 127.5), 0, 255).astype(np.uint8)
    normal_png[~valid] = 128

    # edges: Canny without NMS on the noise-free luminance, as img_as_uint of a scaled magnitude
    grey = _blur3(rgb @ np.array([0.299, 0.587, 0.114]))
    p = np.pad(grey, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:] - p[:-2, :-2] - 2 * p[1:-1, :-2] - p[2:, :-2]) / 8
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:] - p[:-2, :-2] - 2 * p[:-2, 1:-1] - p[:-2, 2:]) / 8
    edge = np.round(np.clip(np.hypot(gx, gy) * 0.25, 0.0, 1.0) * 65535).astype(np.uint16)

    # keypoints: corners of the boxes and of the back wall / window that are visible from the camera
    corners = [
        np.array([x, y, room.upper[2]]) for x in (room.lower[0], room.upper[0]) for y in (room.lower[1], room.upper[1])
    ]
    if room.window is not None:
        xa, xb, ya, yb = room.window
        corners += [np.array([x, y, room.upper[2]]) for x in (xa, xb) for y in (ya, yb)]
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    for box in room.boxes:
        corners += list(box.center + (signs * box.half) @ _rot_y(box.yaw).T)
    cam = (np.array(corners) - position) @ rotation
    t_map = t.reshape(size, size)
    heat = np.zeros((size, size))
    ahead = cam[:, 2] > 0.05
    u = np.where(ahead, focal * cam[:, 0] / np.where(ahead, cam[:, 2], 1) + size / 2, -1)
    v = np.where(ahead, -focal * cam[:, 1] / np.where(ahead, cam[:, 2], 1) + size / 2, -1)
    inside = ahead & (u >= 0) & (u < size) & (v >= 0) & (v < size)
    iu, iv = np.clip(u.astype(int), 0, size - 1), np.clip(v.astype(int), 0, size - 1)
    visible = inside & (cam[:, 2] <= np.where(np.isfinite(t_map[iv, iu]), t_map[iv, iu], np.inf) + 0.05)
    if visible.any():
        sigma = 1.5 * max(1.0, size / 128)
        grid = np.arange(size) + 0.5
        gu = np.exp(-((grid[None, :] - u[visible, None]) ** 2) / (2 * sigma**2))  # [K, W]
        gv = np.exp(-((grid[None, :] - v[visible, None]) ** 2) / (2 * sigma**2))  # [K, H]
        heat = (gv * 1000.0).T @ gu  # separable Gaussians, peak 1000 each
    keypoints = np.round(np.clip(heat, 0, 65535)).astype(np.uint16)

    # segmentation: a 1-pixel rim inside each box silhouette is "uncertain", as annotation boundaries are
    seg = label.reshape(size, size).copy()
    p = np.pad(seg, 1, mode="edge")
    rim = (p[1:-1, :-2] != seg) | (p[1:-1, 2:] != seg) | (p[:-2, 1:-1] != seg) | (p[2:, 1:-1] != seg)
    seg[rim & (seg >= 2)] = 0

    rgb8 = np.clip(np.round(rgb * 255 + rng.normal(0.0, 1.5, rgb.shape)), 0, 255).astype(np.uint8)
    return {
        "rgb": rgb8,
        "depth_zbuffer": depth.reshape(size, size),
        "normal": normal_png.reshape(size, size, 3),
        "edge_texture": edge,
        "keypoints2d": keypoints,
        "segment_semantic": seg,
    }


def make_scene(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """One view of a fresh random room: the six modalities (keys of :data:`DOMAINS`) in raw encodings."""
    room = random_room(rng)
    position, rotation = random_camera(rng, room)
    return render(room, position, rotation, size, rng)


MIN_SIZE = 8  # the smallest image side generate() accepts (the only check of it)


def generate(
    out_dir,
    n: int,
    size: int = 256,
    *,
    seed: int = 0,
    samples_per_shard: int = 1000,
    splits=(("train", 0.8), ("val", 0.1), ("test", 0.1)),
    points_per_building: int = 4,
    views_per_point: int = 3,
    overwrite: bool = False,
    label_fraction: float = 1.0,
) -> dict:
    """Write ``n`` synthetic views as Taskonomy shards + ``manifest.json`` in ``out_dir``; return the manifest.

    ``out_dir`` must be empty or new; ``overwrite=True`` first deletes an earlier shard set there
    (:func:`~l2b_fast.data.shards.prepare_output_dir`).

    Splits get disjoint made-up buildings (``synth0000``, ``synth0001``... numbered across splits, one room
    each); a point is a camera position in the room and its views are different orientations, as in
    Taskonomy. Views are shuffled across buildings per split with a fixed seed before packing. Every room,
    camera and noise draw comes from ``np.random.default_rng([seed, ...])``, so the output (tar bytes
    included) depends only on the arguments.

    ``label_fraction`` < 1: each view keeps each task's label with that probability (at least one task), drawn
    from ``np.random.default_rng([seed, 4, b, p, v])`` (the rendered maps do not change); the members of the
    other tasks are left out, a ``labels.json`` member lists the kept tasks, and each split's manifest entry
    counts the labels per task (``"labels"``).
    """
    label_fraction = check_label_fraction(label_fraction)
    if n < 0:
        raise ValueError(f"need n >= 0 samples, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"image size {size} is too small: synthetic scenes need a size >= {MIN_SIZE}")
    parts = split_counts(n, splits)
    prepare_output_dir(out_dir, overwrite=overwrite)
    per_building = points_per_building * views_per_point
    entries, buildings, next_building = {}, {}, 0
    for split_index, (split, count) in enumerate(parts):
        n_buildings = -(-count // per_building)
        ids = list(range(next_building, next_building + n_buildings))
        next_building += n_buildings
        buildings[split] = [f"synth{b:04d}" for b in ids]
        views = [(b, p, v) for b in ids for p in range(points_per_building) for v in range(views_per_point)][:count]
        order = np.random.default_rng([seed, 3, split_index]).permutation(len(views))

        kept_labels: list[list[str]] = []

        def samples(views=views, order=order, kept_labels=kept_labels):
            rooms = {}
            for i in order:
                b, p, v = views[i]
                if b not in rooms:
                    rooms[b] = random_room(np.random.default_rng([seed, 0, b]))
                room = rooms[b]
                position, _ = random_camera(np.random.default_rng([seed, 1, b, p]), room)
                view_rng = np.random.default_rng([seed, 2, b, p, v])
                _, rotation = random_camera(view_rng, room, position=position)
                raw = render(room, position, rotation, size, view_rng)
                building = f"synth{b:04d}"
                labels = list(TASKS)
                if label_fraction < 1.0:
                    labels = sample_labels(TASKS, label_fraction, np.random.default_rng([seed, 4, b, p, v]))
                kept_labels.append(labels)
                domains = [domain for domain in DOMAINS if domain == "rgb" or domain in labels]
                sample = {f"{domain}.png": encode_png(raw[domain], compress_level=1) for domain in domains}
                if label_fraction < 1.0:
                    sample[LABELS_MEMBER] = labels
                sample["__key__"] = f"{building}_point_{p}_view_{v}"
                sample["json"] = {"building": building, "point": p, "view": v, "size": size}
                yield sample

        entries[split] = write_split(samples(), out_dir, split, samples_per_shard=samples_per_shard)
        entries[split]["labels"] = count_labels(TASKS, kept_labels)
    return write_manifest(
        out_dir,
        "taskonomy",
        size,
        entries,
        seed,
        created_by="l2b_fast.datasets.taskonomy.synthetic",
        synthetic=True,
        buildings=buildings,
        classes=list(CLASSES),
        label_fraction=label_fraction,
    )
