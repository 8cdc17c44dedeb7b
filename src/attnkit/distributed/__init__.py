"""distributed: see DESIGN.md section 2."""
