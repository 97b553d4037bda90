from mlx_gemma_mtp.cli import main

main(prog_name="gemma-mtp")
