def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_build: compiles the CUDA ops")
