"""Raw data as users have it: the dataset layouts `prepare` reads (:mod:`.readers`), tables of captions and labels
(:mod:`.tables`), and the embedded demo dataset (:mod:`.demo`)."""
