"""What a run leaves for people: the console text, the files on disk, the plots."""
