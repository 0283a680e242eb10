"""Drop-ins for models and pipelines from other libraries (diffusers: `.diffusers`)."""
