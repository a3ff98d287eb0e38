"""Region editing and inversion: code swaps, interpolation and inversion of a portrait (manipulation), and the
browser editor of editor.py — its logic (region_editor), web app (editor_web) and page (editor_page.html)."""
