"""The default configs (configs/, linked here) as package data: mvptr.config.project_root reads them when
mvptr is installed outside a checkout."""
