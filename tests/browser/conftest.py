def pytest_configure(config):
    config.addinivalue_line("markers", "browser: runs the HTML report in headless Chromium")
