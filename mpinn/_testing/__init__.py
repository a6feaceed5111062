"""mpinn._testing."""
