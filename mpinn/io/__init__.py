"""mpinn.io."""
