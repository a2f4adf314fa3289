"""The service's routers beyond the core API and pages: one module per subject."""
