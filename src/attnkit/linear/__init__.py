"""linear: see DESIGN.md section 2."""
