"""mpinn.comm."""
