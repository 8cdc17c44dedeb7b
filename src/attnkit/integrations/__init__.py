"""integrations: see DESIGN.md section 2."""
