"""What every stage uses: params (:mod:`.config`) and the compute profile (:mod:`.compute`), errors, files written
atomically, the prepared-data schema (:mod:`.data`) and the stage command helpers (:mod:`.stage`)."""
