import click


@click.group()
@click.version_option(package_name="mlx-gemma-mtp")
def main():
    """Gemma 4 with multi-token-prediction speculative decoding on MLX."""
