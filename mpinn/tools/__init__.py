"""mpinn.tools."""
