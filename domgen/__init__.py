"""domgen: domain-generalisation experiments for COVID-19 lesion segmentation on chest CT."""

__version__ = "0.1.0"
