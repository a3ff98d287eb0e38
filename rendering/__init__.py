"""Rendering a CNeRF generator: cameras, rays and depth samples (camera), the renderer's fast path
(fast_render), building and loading a trained generator for the scripts (loading), identity codes and
latent files (latents), the published inference rendering of views and surfaces (inference), and
meshes without pytorch3d (meshes)."""
