from iotvault.cli.main import run

run()
