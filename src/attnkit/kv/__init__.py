"""kv: see DESIGN.md section 2."""
