def pytest_configure(config):
    config.addinivalue_line("markers", "fuzz: schemathesis against a real server (needs PostgreSQL)")
