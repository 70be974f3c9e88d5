"""gradcomp"""
