"""OCI images and registries: environments as OCI artifacts, and images imported as environments."""
