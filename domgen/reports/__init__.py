"""The paper's tables and figures rebuilt from MLflow alone: a floor above the families, below the command line."""
