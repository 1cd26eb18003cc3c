from recover_lora.cli import main

main()
