"""A procedurally generated, VOC-like segmentation dataset that needs no download.

21 classes: background 0 and 20 objects, each a fixed (shape, colour, texture) triple. Every
image is a textured, low-saturation background with 1-6 objects laid out on a jittered 2x2 or
3x3 grid (one object per cell, so objects never overlap and every planned object is visible).
Which classes an image shows follows a "scene type" (indoor, street, countryside, sky/water)
modelled on VOC's co-occurrences, so the classes added late (16-20) appear next to old classes,
as in the real 15-5 protocol, where old objects are labelled background in new-step images.

Image i is a pure function of (seed, split, i): a scalar plan drawn with `random.Random`
(which `classes_in` reads without rendering), then a vectorised torch rendering at any size.
"""

import colorsys
import math
import random

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .transforms import Normalize, with_saliency

__all__ = ["SyntheticSegmentation", "CLASS_NAMES", "PALETTE", "SCENE_TYPES"]

NUM_CLASSES = 21
SHAPES = ("disc", "square", "triangle", "ring", "bar", "cross", "diamond", "ellipse", "frame", "hexagon")
TEXTURES = ("plain", "stripes", "checker", "dots")
# Class k (1..20): shape k-1 mod 10; classes k and k+10 share a shape but not texture or colour.
CLASS_SHAPE = [None] + [(k - 1) % len(SHAPES) for k in range(1, NUM_CLASSES)]
CLASS_TEXTURE = [None] + [(k - 1 + (k - 1) // 10) % len(TEXTURES) for k in range(1, NUM_CLASSES)]
# Saturated colours with hues spread by the golden ratio; backgrounds stay desaturated.
CLASS_HSV = [None] + [
    (((k - 1) * 0.618034) % 1.0, 0.9 if k % 2 else 0.7, (0.95, 0.8, 0.65)[k % 3]) for k in range(1, NUM_CLASSES)
]
CLASS_NAMES = ["background"] + [f"{SHAPES[CLASS_SHAPE[k]]}-{TEXTURES[CLASS_TEXTURE[k]]}" for k in range(1, NUM_CLASSES)]
PALETTE = torch.tensor(
    [[0, 0, 0]] + [[round(255 * c) for c in colorsys.hsv_to_rgb(*CLASS_HSV[k])] for k in range(1, NUM_CLASSES)],
    dtype=torch.uint8,
)

# (name, classes that tend to appear together, background base colour) -- after VOC's scenes.
SCENE_TYPES = (
    ("indoor", (5, 8, 9, 11, 12, 15, 16, 18, 20), (0.56, 0.50, 0.44)),
    ("street", (2, 6, 7, 14, 15, 19), (0.50, 0.50, 0.50)),
    ("countryside", (3, 10, 12, 13, 15, 17), (0.46, 0.52, 0.42)),
    ("sky-water", (1, 3, 4, 15), (0.46, 0.51, 0.58)),
)
STRAY_PROBABILITY = 0.15  # an object of any class, outside its scene's list
# The point of each shape used to guarantee it covers at least one pixel: (offset along the
# object's u axis, in radii). Hollow shapes (ring, frame) use a point inside their stroke.
_ANCHOR_U = {"ring": 0.75, "frame": 0.54}
_SPLIT_CODES = {"train": 1, "val": 2}
_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _image_seed(seed, split_code, index):
    h = 0
    for value in (seed, split_code, index):
        h = _splitmix64(h ^ (value & _MASK64))
    return h >> 1  # torch seeds must fit in a signed 64-bit int


def _shape_masks(shape, u, v):
    """Inside-tests in the object frame, where every shape fits in the unit disc."""
    au, av = u.abs(), v.abs()
    if shape == "disc":
        return u * u + v * v <= 0.9**2
    if shape == "square":
        return torch.maximum(au, av) <= 0.66
    if shape == "triangle":  # equilateral, centroid at the origin, circumradius 0.95
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            inside &= -(u * math.cos(a) + v * math.sin(a)) <= 0.475
        return inside
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 0.95**2) & (r2 >= 0.55**2)
    if shape == "bar":
        return (au <= 0.95) & (av <= 0.3)
    if shape == "cross":
        return ((au <= 0.9) & (av <= 0.26)) | ((av <= 0.9) & (au <= 0.26))
    if shape == "diamond":
        return au + av <= 0.95
    if shape == "ellipse":
        return (u / 0.95) ** 2 + (v / 0.5) ** 2 <= 1
    if shape == "frame":
        m = torch.maximum(au, av)
        return (m <= 0.68) & (m >= 0.40)
    if shape == "hexagon":
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            a = math.pi * k / 3
            inside &= (u * math.cos(a) + v * math.sin(a)).abs() <= 0.8
        return inside
    raise AssertionError(shape)


def _square_wave(t):
    """+1 on the first half of each unit period of t, -1 on the second (a sign(sin) without sin)."""
    return torch.where(torch.remainder(t, 1.0) < 0.5, 1.0, -1.0)


def _texture(texture, u, v):
    """A brightness modulation in [-1, 1], in object coordinates (so it scales with the object)."""
    if texture == "plain":
        return torch.zeros_like(u)
    if texture == "stripes":
        return _square_wave(1.4 * u)
    if texture == "checker":
        return _square_wave(1.1 * u) * _square_wave(1.1 * v)
    if texture == "dots":  # a lattice of discs, period 1/1.3 radius
        du = torch.remainder(1.3 * u + 0.5, 1.0) - 0.5
        dv = torch.remainder(1.3 * v + 0.5, 1.0) - 0.5
        return torch.where(du * du + dv * dv < 0.3**2, 1.0, -0.6)
    raise AssertionError(texture)


class SyntheticSegmentation(Dataset):
    """Deterministic synthetic scenes: image float32 (3, H, W) normalised, label int64 (H, W).

    `transform` is a joint (image, label) transform applied to the [0, 1] image before the
    normalisation (do not put `Normalize` in it). `cache=True` keeps rendered images in memory.
    `saliency=True`: each item is (image, label, saliency), the bool (H, W) map of the pixels of
    every object, whatever its class (docs/DATA.md, the stand-in for a saliency detector).
    """

    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(
        self,
        split="train",
        num_images=None,
        image_size=64,
        seed=0,
        transform=None,
        cache=False,
        normalize=True,
        saliency=False,
    ):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if num_images is None:
            num_images = 2000 if split == "train" else 500
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 16:
            raise ValueError(f"image_size must be an int or (H, W), each at least 16, got {image_size!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.split, self.num_images, self.image_size, self.seed = split, num_images, size, seed
        self.transform = transform
        self.normalize = Normalize() if normalize else None
        self.saliency = saliency
        self.cache_key = f"synthetic-v1-{split}-n{num_images}-seed{seed}"
        self._cache = {} if cache else None
        self._classes = {}

    def __len__(self):
        return self.num_images

    def _check_index(self, i):
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"index {i} out of range for {self.num_images} images")
        return i % self.num_images

    def plan(self, i):
        """The scalar description of image i: scene type and objects (class, cell, geometry)."""
        i = self._check_index(i)
        rng = random.Random(_image_seed(self.seed, _SPLIT_CODES[self.split], i))
        scene = rng.randrange(len(SCENE_TYPES))
        grid = rng.choice((2, 3))
        count = rng.randint(1, 4) if grid == 2 else rng.randint(2, 6)
        scene_classes = SCENE_TYPES[scene][1]
        classes = [
            rng.randint(1, NUM_CLASSES - 1) if rng.random() < STRAY_PROBABILITY else rng.choice(scene_classes)
            for _ in range(count)
        ]
        cells = rng.sample(range(grid * grid), count)
        objects = []
        for cls, cell in zip(classes, cells, strict=True):
            objects.append(
                {
                    "class": cls,
                    "row": cell // grid,
                    "col": cell % grid,
                    # centre jitter and radius in cell units: 0.06 + 0.43 < 0.5, so objects stay in their cell
                    "jitter": (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)),
                    "radius": rng.uniform(0.27, 0.43),
                    "angle": rng.uniform(0, 2 * math.pi),
                    "hue_shift": rng.uniform(-0.02, 0.02),
                    "brightness": rng.uniform(0.85, 1.1),
                    "light_angle": rng.uniform(0, 2 * math.pi),
                }
            )
        return {"scene": scene, "grid": grid, "objects": objects, "noise_seed": rng.getrandbits(62)}

    def classes_in(self, i):
        """Classes present in image i (background included), read from the plan, no rendering."""
        i = self._check_index(i)
        if i not in self._classes:
            self._classes[i] = frozenset([0] + [obj["class"] for obj in self.plan(i)["objects"]])
        return self._classes[i]

    def render(self, i):
        """Image i as (float32 (3, H, W) in [0, 1], int64 (H, W)), before transform and normalisation."""
        plan = self.plan(i)
        h, w = self.image_size
        gen = torch.Generator().manual_seed(plan["noise_seed"])
        image = self._background(plan["scene"], h, w, gen)

        objects, grid = plan["objects"], plan["grid"]
        k = len(objects)
        cell_h, cell_w = h / grid, w / grid
        cx = torch.tensor([(o["col"] + 0.5 + o["jitter"][0]) * cell_w for o in objects])
        cy = torch.tensor([(o["row"] + 0.5 + o["jitter"][1]) * cell_h for o in objects])
        radius = torch.tensor([o["radius"] * min(cell_h, cell_w) for o in objects])
        angle = torch.tensor([o["angle"] for o in objects])
        ys = torch.arange(h, dtype=torch.float32) + 0.5
        xs = torch.arange(w, dtype=torch.float32) + 0.5
        dx = (xs[None, None, :] - cx[:, None, None]) / radius[:, None, None]  # (K, 1, W)
        dy = (ys[None, :, None] - cy[:, None, None]) / radius[:, None, None]  # (K, H, 1)
        cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
        u = cos * dx + sin * dy  # (K, H, W) object frame
        v = -sin * dx + cos * dy

        masks = torch.zeros(k, h, w, dtype=torch.bool)
        shading = torch.zeros(k, h, w)
        colours = torch.zeros(k, 3)
        anchor_x, anchor_y = [], []
        for j, obj in enumerate(objects):
            cls = obj["class"]
            shape, texture = SHAPES[CLASS_SHAPE[cls]], TEXTURES[CLASS_TEXTURE[cls]]
            masks[j] = _shape_masks(shape, u[j], v[j])
            light = math.cos(obj["light_angle"]) * u[j] + math.sin(obj["light_angle"]) * v[j]
            shading[j] = (1 + 0.22 * _texture(texture, u[j], v[j])) * (1 + 0.12 * light)
            hue, sat, val = CLASS_HSV[cls]
            colours[j] = torch.tensor(
                colorsys.hsv_to_rgb((hue + obj["hue_shift"]) % 1.0, sat, min(1.0, val * obj["brightness"]))
            )
            a = _ANCHOR_U.get(shape, 0.0) * obj["radius"] * min(cell_h, cell_w)
            anchor_x.append(float(cx[j]) + a * math.cos(obj["angle"]))
            anchor_y.append(float(cy[j]) + a * math.sin(obj["angle"]))
        # Tiny renderings could miss a thin shape between pixel centres: its anchor pixel is always in.
        px = torch.tensor(anchor_x).floor().long().clamp(0, w - 1)
        py = torch.tensor(anchor_y).floor().long().clamp(0, h - 1)
        masks[torch.arange(k), py, px] = True

        # The object owning each pixel (the last one drawn, should two ever touch), as a one-hot
        # (K, H, W): elementwise ops stay fast where advanced indexing would not.
        index = torch.arange(1, k + 1)[:, None, None]
        owned = (masks * index).amax(0, keepdim=True) == index
        classes = torch.tensor([o["class"] for o in objects])
        label = (owned * classes[:, None, None]).sum(0)
        object_rgb = torch.einsum("khw,kc->chw", owned * shading, colours)
        image = torch.where(owned.any(0), object_rgb, image)
        image = image + 0.03 * torch.randn(3, h, w, generator=gen)
        return image.clamp(0, 1), label

    @staticmethod
    def _background(scene, h, w, gen):
        """Desaturated base colour + low-frequency blotches + a vertical gradient + grain."""
        base = torch.tensor(SCENE_TYPES[scene][2]) + 0.06 * (torch.rand(3, generator=gen) - 0.5)
        coarse = torch.randn(1, 1, 5, 5, generator=gen)
        luminance = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
        tint = F.interpolate(torch.randn(1, 3, 3, 3, generator=gen), size=(h, w), mode="bilinear", align_corners=False)[
            0
        ]
        gradient = torch.linspace(0.08, -0.08, h)[None, :, None] * torch.randn((), generator=gen).sign()
        grain = torch.randn(1, h, w, generator=gen)
        return base[:, None, None] + 0.09 * luminance + 0.03 * tint + gradient + 0.04 * grain

    def __getitem__(self, i):
        i = self._check_index(i)
        if self._cache is not None and i in self._cache:
            image, label = self._cache[i]
        else:
            image, label = self.render(i)
            if self._cache is not None:
                self._cache[i] = (image, label)
        if self.saliency:
            image, label, salient = with_saliency(self.transform, image, label, label > 0)
        elif self.transform is not None:
            image, label = self.transform(image, label)
        if self.normalize is not None:
            image, label = self.normalize(image, label)
        return (image, label, salient) if self.saliency else (image, label)
