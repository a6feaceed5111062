"""mpinn.partition."""
