def pytest_configure(config):
    config.addinivalue_line("markers", "drill: fault drill against private PostgreSQL/Redis the drill starts itself")
