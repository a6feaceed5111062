"""mpinn.engine."""
