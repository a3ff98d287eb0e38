"""Shapes without pytorch3d: depth-map meshes, marching-cubes meshes and shaded renderings (SPEC §15).

* depth_mesh: the renderer's surface points (one per pixel) triangulated by Delaunay over the pixel
  grid, faces oriented so their normals face the camera.
* sdf_mesh: marching cubes (skimage) of the SDF sampled on the renderer's frustum-aligned grid
  (pixel row × pixel column × sample along the ray), closed into a watertight mesh.
* shade_mesh: a shaded image of a mesh seen from a pinhole camera, by ray casting with trimesh
  (embree when embreex is installed): a point light, ambient + diffuse + a little specular.
"""
import os

import numpy as np
import torch
import trimesh
from scipy.spatial import Delaunay

from common.cli import UsageError
from common.files import atomic_write
from rendering.camera import camera_rays, pixel_grid


class MeshError(UsageError):
    """No surface to extract (one-line message)."""


def _numpy(x):
    return x.detach().float().cpu().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------------------- depth mesh


def grid_faces(height, width):
    """Delaunay triangles over the pixel grid (vertex index = row * width + col), [F,3].

    Every face is wound clockwise in (col, row) image coordinates: the image's y axis points down, so
    that is counter-clockwise as the camera sees it, i.e. the face normals point towards the camera.
    """
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    uv = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.float64)
    faces = Delaunay(uv).simplices.astype(np.int64)
    a, b, c = uv[faces[:, 0]], uv[faces[:, 1]], uv[faces[:, 2]]
    signed_area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    # Qhull does not promise one winding; make every face clockwise in image coordinates.
    flip = signed_area > 0
    faces[flip] = faces[flip][:, [1, 0, 2]]
    return faces


def depth_mesh(xyz, mask=None, background_threshold=0.5):
    """Mesh of per-pixel surface points xyz [3,H,W] (world coordinates).

    `mask` [1,H,W] / [H,W] is the renderer's last-sample weight: a ray whose weight reaches the far end
    hit no surface, so its point is not part of the shape; faces touching such pixels are dropped.
    Vertices keep the pixel order (vertex row*W + col) so that maps over pixels stay aligned.
    """
    xyz = _numpy(xyz)
    _, height, width = xyz.shape
    vertices = xyz.reshape(3, -1).T
    faces = grid_faces(height, width)
    if mask is not None:
        background = _numpy(mask).reshape(-1) > background_threshold
        faces = faces[~background[faces].any(1)]
    return trimesh.Trimesh(vertices=vertices, faces=faces, process=False)


# ----------------------------------------------------------------------------------- marching cubes


def frustum_positions(index_coords, points):
    """World positions of fractional (row, col, sample) indices on the frustum grid `points` [H,W,S,3].

    The grid points are o + d(row, col) z(sample) with d affine in (row, col) and z affine in the
    sample index, so trilinear interpolation/extrapolation from the grid is exact.
    """
    points = _numpy(points).astype(np.float64)
    shape = np.array(points.shape[:3])
    # Extrapolate linearly one cell beyond the grid so the closing faces of a padded volume have places.
    lo = np.clip(np.floor(index_coords).astype(np.int64), 0, shape - 2)
    frac = index_coords - lo
    out = np.zeros((index_coords.shape[0], 3))
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        weight = np.prod(np.where(offs == 1, frac, 1 - frac), axis=1)
        idx = lo + offs
        out += weight[:, None] * points[idx[:, 0], idx[:, 1], idx[:, 2]]
    return out


def sdf_mesh(sdf, points, level=0.0):
    """Watertight marching-cubes mesh of the zero level set of sdf [H,W,S] sampled at points [H,W,S,3].

    The volume is padded with one layer of "outside" values so that surfaces reaching the edge of the
    frustum are closed. Normals point outwards (towards positive SDF). Raises MeshError when the SDF
    has no zero crossing.
    """
    from skimage.measure import marching_cubes

    sdf = _numpy(sdf).astype(np.float32)
    if sdf.ndim != 3 or sdf.shape[:3] != tuple(_numpy(points).shape[:3]):
        raise ValueError(f"sdf_mesh expects sdf [H,W,S] and points [H,W,S,3], got {sdf.shape} and "
                         f"{tuple(_numpy(points).shape)}")
    if not np.isfinite(sdf).all():
        raise MeshError("the SDF has non-finite values")
    lo, hi = float(sdf.min()), float(sdf.max())
    if not lo < level < hi:
        raise MeshError(f"no surface: the SDF has no zero crossing (values in [{lo:.4g}, {hi:.4g}])")
    outside = max(hi, level + 1e-3)
    padded = np.pad(sdf, 1, mode="constant", constant_values=outside)
    verts, faces, _, _ = marching_cubes(padded, level=level)
    world = frustum_positions(verts - 1.0, points)
    mesh = trimesh.Trimesh(vertices=world, faces=faces, process=True)
    # The index → world map may mirror the volume; orient so the enclosed volume is positive.
    if mesh.is_watertight and mesh.volume < 0:
        mesh.invert()
    return mesh


def save_mesh(mesh, path):
    """Export a mesh (.obj or .ply by the path's extension) atomically."""
    path = str(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("obj", "ply"):
        raise UsageError(f"{path}: mesh files must end in .obj or .ply")
    atomic_write(path, lambda tmp: mesh.export(tmp, file_type=ext))


# ------------------------------------------------------------------------------------------ shading


def _intersector(mesh):
    try:
        from trimesh.ray.ray_pyembree import RayMeshIntersector

        return RayMeshIntersector(mesh)
    except Exception:  # embreex missing: trimesh's pure-numpy intersector (slow but correct)
        from trimesh.ray.ray_triangle import RayMeshIntersector

        return RayMeshIntersector(mesh)


def shade_surface(surface, size, mesh=None):
    """Shaded picture uint8 [size,size,3] of a rendered surface (rendering.inference.render_surface): its
    depth mesh (or `mesh`) seen from the surface's camera, the focal length rescaled from the surface
    renderer's resolution to `size`."""
    mesh = depth_mesh(surface.xyz, surface.mask) if mesh is None else mesh
    return shade_mesh(mesh, surface.extrinsics, surface.focal * size / surface.resolution, size)


def shade_mesh(mesh, extrinsics, focal, resolution, albedo=(0.75, 0.75, 0.75), ambient=0.15, diffuse=0.75,
               specular=0.15, shininess=24.0, background=(255, 255, 255), light_offset=(0.0, 0.3, 0.0)):
    """Shaded rendering uint8 [res,res,3] of `mesh` from a pinhole camera.

    extrinsics [3,4] camera-to-world, focal: the focal length in pixels at `resolution`. The point light
    sits at the camera, moved by `light_offset` in camera coordinates (slightly above, so that shapes
    read as 3-D). Normals are interpolated across faces and turned to face the viewer.
    """
    extrinsics = torch.as_tensor(_numpy(extrinsics), dtype=torch.float64)
    gx, gy = pixel_grid(resolution, resolution)
    focal_t = torch.full((1, 1, 1), float(focal), dtype=torch.float64)
    origins, dirs, _ = camera_rays(gx.double(), gy.double(), focal_t, extrinsics[None])
    origins = origins.reshape(-1, 3).numpy()
    dirs = dirs.reshape(-1, 3).numpy()
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    image = np.empty((resolution * resolution, 3), dtype=np.float64)
    image[:] = np.asarray(background, dtype=np.float64) / 255.0
    if len(mesh.faces) == 0:
        return (image.reshape(resolution, resolution, 3) * 255).round().astype(np.uint8)

    locations, ray_index, tri_index = _intersector(mesh).intersects_location(origins, dirs, multiple_hits=False)
    if len(ray_index):
        triangles = mesh.triangles[tri_index]
        bary = trimesh.triangles.points_to_barycentric(triangles, locations)
        vertex_normals = mesh.vertex_normals[mesh.faces[tri_index]]  # [n,3,3]
        normals = np.einsum("nk,nkc->nc", bary, vertex_normals)
        face_normals = mesh.face_normals[tri_index]
        # Vertices of faces dropped around them can have zero normals: fall back to the face normal.
        length = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = np.where(length > 1e-8, normals / np.maximum(length, 1e-8), face_normals)
        view = -dirs[ray_index]
        normals = np.where((np.sum(normals * view, 1) < 0)[:, None], -normals, normals)

        rotation = extrinsics[:, :3].numpy()
        light_pos = extrinsics[:, 3].numpy() + rotation @ np.asarray(light_offset, dtype=np.float64)
        to_light = light_pos[None] - locations
        to_light /= np.maximum(np.linalg.norm(to_light, axis=1, keepdims=True), 1e-12)
        n_dot_l = np.clip(np.sum(normals * to_light, 1), 0, None)
        reflected = 2 * n_dot_l[:, None] * normals - to_light
        spec = np.clip(np.sum(reflected * view, 1), 0, None) ** shininess * (n_dot_l > 0)
        color = np.asarray(albedo)[None] * (ambient + diffuse * n_dot_l)[:, None] + specular * spec[:, None]
        image[ray_index] = np.clip(color, 0, 1)
    return (image.reshape(resolution, resolution, 3) * 255).round().astype(np.uint8)
