from portal_sync.cli import main_entry

main_entry()
