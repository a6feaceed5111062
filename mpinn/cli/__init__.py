"""mpinn.cli."""
